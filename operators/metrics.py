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

UPDATE_NORM = Histogram("fedfm_update_norm", "L2 norm of the accepted client updates", ["federation"],
                        buckets=(0.001, 0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30, 100))
# From what the pipeline reports on the Federation's status (short-lived steps need no Pushgateway).
ROUNDS_COMPLETED = Gauge("fedfm_rounds_completed", "The last round aggregated (Federation status.lastAggregate)",
                         ["federation"])
ROUND_SECONDS = Histogram("fedfm_round_duration_seconds", "A round from its first client's start to the new "
                          "global adapter", ["federation"],
                          buckets=(10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400))
GLOBAL_EVAL = {metric: Gauge(f"fedfm_global_eval_{metric}", f"Global evaluation {metric} of the last evaluated "
                             "global adapter", ["federation"]) for metric in ("loss", "accuracy", "perplexity")}
PRIVACY_EPSILON = Gauge("fedfm_privacy_epsilon", "Differential-privacy ε spent so far (at the run's δ), from the "
                        "Federation's status.lastAggregate.privacy", ["federation"])
ROUND_RUNNING = Gauge("fedfm_round_running_seconds", "Age of the federation's oldest unfinished ClientRound "
                      "(0: none)", ["federation"])
ROUND_DEADLINE = Gauge("fedfm_round_deadline_seconds", "The federation's round deadline (policy)", ["federation"])

_phases: dict[tuple[str, str], tuple[str, str]] = {}
_lock = threading.Lock()


def client_phase(namespace: str, name: str, federation: str, phase: str | None) -> None:
    """Record a FederatedClient's phase (None when it is gone) and refresh the gauge."""
    with _lock:
        recorded = _phases.get((namespace, name))
        if recorded == (None if phase is None else (federation, phase)):
            return  # nothing moved: the tally of every client is not taken again (each member, every few seconds)
        if phase is None:
            _phases.pop((namespace, name), None)
        else:
            _phases[(namespace, name)] = (federation, phase)
        counts = Tally((fed, ns, ph) for (ns, _), (fed, ph) in _phases.items())
        CLIENTS.clear()
        for labels, count in counts.items():
            CLIENTS.labels(*labels).set(count)


def client_round_finished(federation: str, namespace: str, purpose: str, outcome: str, seconds: float | None,
                          bytes_down: int = 0, bytes_up: int = 0, update_norm: float | None = None) -> None:
    CLIENT_ROUNDS.labels(federation, namespace, purpose, outcome).inc()
    if update_norm is not None:
        UPDATE_NORM.labels(federation).observe(update_norm)
    if seconds is not None:
        CLIENT_ROUND_SECONDS.labels(federation, purpose).observe(seconds)
    if bytes_down:
        BYTES.labels(federation, "down").inc(bytes_down)
    if bytes_up:
        BYTES.labels(federation, "up").inc(bytes_up)


def federation_observed(federation: str, completed_round: int, evaluation: dict[str, float],
                        running_seconds: float, deadline_seconds: float | None, epsilon: float | None = None) -> None:
    """The gauges of one Federation, from its status and its ClientRounds."""
    ROUNDS_COMPLETED.labels(federation).set(completed_round)
    if epsilon is not None:
        PRIVACY_EPSILON.labels(federation).set(epsilon)
    for metric, gauge in GLOBAL_EVAL.items():
        if metric in evaluation:
            gauge.labels(federation).set(evaluation[metric])
    ROUND_RUNNING.labels(federation).set(running_seconds)
    if deadline_seconds:
        ROUND_DEADLINE.labels(federation).set(deadline_seconds)
    else:
        _forget(ROUND_DEADLINE, federation)


def round_completed(federation: str, seconds: float) -> None:
    ROUND_SECONDS.labels(federation).observe(seconds)


def federation_deleted(federation: str) -> None:
    for gauge in (ROUNDS_COMPLETED, ROUND_RUNNING, ROUND_DEADLINE, PRIVACY_EPSILON, *GLOBAL_EVAL.values()):
        _forget(gauge, federation)


def _forget(gauge: Gauge, *labels: str) -> None:
    try:
        gauge.remove(*labels)
    except KeyError:
        pass
