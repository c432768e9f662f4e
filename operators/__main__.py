"""Run the FedFM operator: ``python -m fedfm.operators [--namespace NS ...] [--metrics-port PORT]``."""

from __future__ import annotations

import argparse
import logging

import kopf
from prometheus_client import start_http_server


def _quiet_timers(record: logging.LogRecord) -> bool:
    """Status timers run every few seconds per object; log only when they fail or something changed."""
    message = record.getMessage()
    return not (record.levelno == logging.INFO and message.startswith("Timer '") and message.endswith("succeeded."))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fedfm.operators", description=__doc__)
    parser.add_argument("--namespace", "-n", action="append", default=[],
                        help="watch only these namespaces (repeatable); default: the whole cluster")
    parser.add_argument("--metrics-port", type=int, default=8080, help="Prometheus metrics port (0: off)")
    parser.add_argument("--liveness", default=None, help="liveness endpoint, e.g. http://0.0.0.0:8081/healthz")
    parser.add_argument("--training-runtime", default=None,
                        help="the Kubeflow Trainer ClusterTrainingRuntime multi-node clients' fine-tunes run on "
                             "(the chart's, with trainer.enabled); default: none, such clients are refused")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)

    kopf.configure(verbose=args.verbose)
    if not args.verbose:
        logging.getLogger("kopf.objects").addFilter(_quiet_timers)
    if args.metrics_port:
        start_http_server(args.metrics_port)
    import fedfm.operators.handlers  # noqa: F401  (registers the handlers)
    from fedfm.operators import kube, trainer

    kube.watch_only(args.namespace)
    trainer.use_runtime(args.training_runtime)

    kopf.run(clusterwide=not args.namespace, namespaces=args.namespace, standalone=True,
             liveness_endpoint=args.liveness)


if __name__ == "__main__":
    main()
