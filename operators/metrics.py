"""Prometheus metrics of the operator, served on its own port (prometheus-client).

Labels are bounded: federation, namespace, phase, purpose, outcome, direction — never a client or
round name.
"""

from __future__ import annotations

import threading
from collections import Counter as Tally

from prometheus_client import Counter, Gauge, Histogram

CLIENTS = Gauge("fedfm_clients", "FederatedClients by phase", ["federation", "namespace", "phase"])
CLIENT_ROUNDS = Counter("fedfm_client_rounds_total", "ClientRounds that reached a final phase",
                        ["federation", "namespace", "purpose", "outcome"])
CLIENT_ROUND_SECONDS = Histogram("fedfm_client_round_duration_seconds",
                                 "Time from a ClientRound's start to its final phase", ["federation", "purpose"],
                                 buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600))
BYTES = Counter("fedfm_bytes_total", "Adapter bytes moved between a federation and its clients "
                                     "(down: global adapters read, up: updates sent)", ["federation", "direction"])

_phases: dict[tuple[str, str], tuple[str, str]] = {}
_lock = threading.Lock()


def client_phase(namespace: str, name: str, federation: str, phase: str | None) -> None:
    """Record a FederatedClient's phase (None when it is gone) and refresh the gauge."""
    with _lock:
        if phase is None:
            _phases.pop((namespace, name), None)
        else:
            _phases[(namespace, name)] = (federation, phase)
        counts = Tally((fed, ns, ph) for (ns, _), (fed, ph) in _phases.items())
        CLIENTS.clear()
        for labels, count in counts.items():
            CLIENTS.labels(*labels).set(count)


def client_round_finished(federation: str, namespace: str, purpose: str, outcome: str, seconds: float | None,
                          bytes_down: int = 0, bytes_up: int = 0) -> None:
    CLIENT_ROUNDS.labels(federation, namespace, purpose, outcome).inc()
    if seconds is not None:
        CLIENT_ROUND_SECONDS.labels(federation, purpose).observe(seconds)
    if bytes_down:
        BYTES.labels(federation, "down").inc(bytes_down)
    if bytes_up:
        BYTES.labels(federation, "up").inc(bytes_up)
