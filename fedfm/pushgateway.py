"""A local run's figures pushed to a Prometheus Pushgateway (``fedfm run --pushgateway URL``).

In a cluster the operator exports the metrics; a run on a laptop or a CI machine has no operator, so
it pushes the same metrics (same names and meanings, see docs/kubeflow/monitoring.md) after every step,
grouped by ``job="fedfm"`` and ``federation``.
"""

from __future__ import annotations

import urllib.error
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, push_to_gateway

from fedfm.errors import ConfigError

JOB = "fedfm"


class PushgatewayReporter:
    job = JOB

    def __init__(self, url: str, federation: str):
        self.url, self.federation = url, federation
        self.registry = CollectorRegistry()
        self.rounds = Gauge("fedfm_rounds_completed", "The last round aggregated", registry=self.registry)
        self.evaluation = {metric: Gauge(f"fedfm_global_eval_{metric}", f"Global evaluation {metric} of the last "
                                         "evaluated global adapter", registry=self.registry)
                           for metric in ("loss", "accuracy", "perplexity")}
        self.client_rounds = Counter("fedfm_client_rounds", "Client fine-tunes and evaluations by outcome",
                                     ["purpose", "outcome"], registry=self.registry)
        self.round_seconds = Histogram("fedfm_round_duration_seconds", "A round from its first client's start to "
                                       "the new global adapter", registry=self.registry,
                                       buckets=(10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400))
        self.failures = 0
        self._push(first=True)

    def on_event(self, event: dict[str, Any]) -> None:
        """Take one step event (fedfm.events) and push the updated figures."""
        kind, step = event.get("event"), event.get("step")
        if kind not in ("finished", "failed"):
            return
        if step == "client_finetune":
            outcome = "Failed" if kind == "failed" else event.get("phase", "Succeeded")
            self.client_rounds.labels("Train", outcome).inc()
        elif step == "aggregate" and kind == "finished":
            self.rounds.set(event["round"])
            if event.get("round_seconds"):
                self.round_seconds.observe(event["round_seconds"])
        elif step == "evaluate" and kind == "finished":
            for metric, gauge in self.evaluation.items():
                if metric in event:
                    gauge.set(event[metric])
        else:
            return
        self._push()

    def _push(self, first: bool = False) -> None:
        try:
            push_to_gateway(self.url, job=JOB, registry=self.registry, grouping_key={"federation": self.federation},
                            timeout=10)
        except (OSError, urllib.error.URLError, ValueError) as exc:
            if first:  # a wrong URL is a bad input: say so before any work starts
                raise ConfigError(f"cannot push metrics to the Pushgateway at {self.url}: {exc}") from None
            self.failures += 1  # later hiccups must not fail a long run; the run reports them at the end
