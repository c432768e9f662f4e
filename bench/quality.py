"""Federated quality on real data (AG News): against the centralized baseline, and rule against rule.

    python bench/quality.py [--data ../shared/data/ag_news_test.csv] [--rounds 10] [--clients 8] [--alpha 0.3]
    python bench/quality.py --strategy fedavg --strategy fedadam --strategy 'fedyogi:{"eta": 0.01}' \
        --strategy fedprox --strategy fedmedian --strategy flexlora [--engine simulate]
    python bench/quality.py --variant 'plain:{}' --variant 'int8:{"compression.method": "int8"}' \
        --variant 'eps=8:{"privacy.target_epsilon": 8, "privacy.clip_norm": 1}' [--engine simulate]

Setup (DEVELOPERS.md / issue #2): all-MiniLM-L6-v2 + LoRA, 8 tenants with Dirichlet(0.3) label skew,
each tenant's rows split 80/20 into train/eval (the union of the eval splits is the global test set),
10 rounds with 30 local steps of batch 16 per client and round.

Without ``--strategy``: FedAvg against the centralized baseline, which pools every tenant's training
rows into one client and runs the same total number of optimizer steps (clients × local steps per
round) over the same rounds, evaluated on the same rows; prints both accuracies and their ratio
(target ≥ 0.98). With ``--strategy NAME[:PARAMS_JSON]`` (repeatable): each rule on the same tenants,
data and budget, side by side, accuracy per round. ``--variant LABEL:OVERRIDES_JSON`` (repeatable)
does the same for config overrides (dotted paths) on top of FedAvg: compression, privacy. Rank-aware
rules (hetlora, flexlora, flora) get mixed client ranks (``--mixed-ranks``, cycled over the clients);
the others train ``--lora-r``.
``--engine pipeline`` (default) runs through the local KFP pipeline as ``fedfm run`` does;
``--engine simulate`` runs in process as ``fedfm simulate`` does (same results, less overhead).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "ag_news_test.csv"


def add_setup_arguments(parser: argparse.ArgumentParser, *, clients: int = 8) -> None:
    """The options of the AG News setup (data, federation size, training budget) that :func:`ag_news_config`
    reads; other benches (``robust.py``) share them."""
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--clients", type=int, default=clients)
    parser.add_argument("--alpha", type=float, default=0.3)
    parser.add_argument("--local-steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)


def data_missing(args, bench: str) -> bool:
    """Say so on stderr when the AG News file is not where ``--data`` points."""
    if args.data.exists():
        return False
    print(f"{bench}: the AG News data is not at {args.data} (it lives in ../shared/data/ beside the "
          "repository and is never committed); pass --data PATH", file=sys.stderr)
    return True


def ag_news_config(args):
    """The benchmark federation on AG News (labels resolved from the data), from :func:`add_setup_arguments`'
    options."""
    from fedfm.config import FederationConfig
    from fedfm.data import resolve_labels

    return resolve_labels(FederationConfig.parse({
        "name": "ag-news",
        "model": {"name_or_path": "sentence-transformers/all-MiniLM-L6-v2", "max_length": args.max_length},
        "task": "classification",
        "data": {"source": str(args.data), "text_column": ["title", "description"], "label_column": "label",
                 "partition": f"dirichlet:{args.alpha}", "eval_fraction": 0.2},
        "clients": args.clients,
        "rounds": args.rounds,
        "training": {"local_steps": args.local_steps, "batch_size": args.batch_size,
                     "learning_rate": args.learning_rate},
        "lora": {"r": args.lora_r, "alpha": 2 * args.lora_r},
        "seed": args.seed,
    }))


def describe_setup(cfg, data: Path) -> None:
    """Print the data file, the labels and each tenant's rows."""
    from fedfm.data import describe_clients

    print(f"AG News: {data}; labels {cfg.data.labels}")
    for client, info in describe_clients(cfg).items():
        print(f"  {client}: train {info['train']:4d} eval {info['eval']:4d}  labels {info['labels']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_setup_arguments(parser)
    parser.add_argument("--strategy", action="append", default=[], metavar="NAME[:PARAMS_JSON]",
                        help="compare these rules side by side (repeatable) instead of FedAvg vs centralized")
    parser.add_argument("--variant", action="append", default=[], metavar="LABEL:OVERRIDES_JSON",
                        help="compare these config variants (dotted-path overrides) side by side (repeatable)")
    parser.add_argument("--mixed-ranks", default="4,8,16", help="LoRA ranks cycled over the clients for "
                                                                "rank-aware rules")
    parser.add_argument("--engine", choices=["pipeline", "simulate"], default="pipeline")
    parser.add_argument("--output", type=Path,
                        default=ROOT / "runs" / f"bench-quality-{time.strftime('%Y%m%d-%H%M%S')}")
    args = parser.parse_args()

    if data_missing(args, "bench/quality.py"):
        return 2

    from fedfm.pipelines.local_runner import run_local

    cfg = ag_news_config(args)
    describe_setup(cfg, args.data)

    if args.engine == "simulate":
        from fedfm.simulation import simulate as run_local  # noqa: F811 (same signature, in process)
    if args.strategy or args.variant:
        return compare(cfg, args, run_local)

    results = {}
    for mode, run_cfg in (("federated", cfg), ("centralized", cfg.with_overrides({"centralized": True}))):
        print(f"\n== {mode}: {len(run_cfg.training_clients)} training client(s), "
              f"{run_cfg.local_steps_for(run_cfg.training_clients[0])} steps each per round, {cfg.rounds} rounds")
        started = time.time()
        run = run_local(run_cfg, args.output / mode, on_event=_round_printer(sys.stdout))
        accuracy = [record["eval"]["global"]["accuracy"] for record in run.history]
        results[mode] = {"accuracy": accuracy, "final_accuracy": accuracy[-1], "seconds": time.time() - started}

    federated, centralized = results["federated"]["final_accuracy"], results["centralized"]["final_accuracy"]
    ratio = federated / centralized
    print("\nround  federated  centralized")
    for index, (fed, cen) in enumerate(zip(results["federated"]["accuracy"], results["centralized"]["accuracy"])):
        print(f"{index:5d}  {fed:9.4f}  {cen:11.4f}")
    print(f"\nfederated accuracy   {federated:.4f}  ({results['federated']['seconds']:.0f} s)")
    print(f"centralized accuracy {centralized:.4f}  ({results['centralized']['seconds']:.0f} s)")
    print(f"ratio                {ratio:.4f}  (target >= 0.98: {'met' if ratio >= 0.98 else 'NOT met'})")
    best = max(results["federated"]["accuracy"]) / max(results["centralized"]["accuracy"])
    print(f"ratio of the best rounds {best:.4f}  (federated {max(results['federated']['accuracy']):.4f}, "
          f"centralized {max(results['centralized']['accuracy']):.4f})")
    summary = {"config": cfg.as_dict(), "results": results, "ratio": ratio, "best_round_ratio": best}
    (args.output / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"details: {args.output}/summary.json, {args.output}/*/metrics.json, report.png")
    return 0


def compare(cfg, args, run) -> int:
    """Each ``--strategy`` and ``--variant`` on the same federation; a table of accuracy per round, and the
    finals."""
    results = {}
    for index, (label, overrides) in enumerate(_contenders(cfg, args)):
        name = re.sub(r"[^a-z0-9.=-]+", "-", label.split(" ")[0].lower())
        run_cfg = cfg.with_overrides(overrides)
        print(f"\n== {label}")
        started = time.time()
        history = run(run_cfg, args.output / f"{index}-{name}", on_event=_round_printer(sys.stdout)).history
        accuracy = [record["eval"]["global"]["accuracy"] for record in history]
        results[label] = {"accuracy": accuracy, "final_accuracy": accuracy[-1], "best_accuracy": max(accuracy),
                          "seconds": time.time() - started, "bytes_up": [r["bytes_up"] for r in history[1:]]}
        if "privacy" in history[-1]:
            results[label]["epsilon"] = history[-1]["privacy"]["epsilon"]
    labels = list(results)
    rows = max(len(result["accuracy"]) for result in results.values())  # a privacy budget may allow fewer rounds
    print("\nround  " + "  ".join(f"{label.split(' ')[0][:14]:>14}" for label in labels))
    for index in range(rows):
        print(f"{index:5d}  " + "  ".join(f"{results[label]['accuracy'][index]:14.4f}"
                                          if index < len(results[label]["accuracy"]) else f"{'-':>14}"
                                          for label in labels))
    print()
    for label, result in results.items():
        spent = f"  ε {result['epsilon']:.3f}" if "epsilon" in result else ""
        print(f"{label:40s} final {result['final_accuracy']:.4f}  best {result['best_accuracy']:.4f}  "
              f"bytes up/round {sum(result['bytes_up']) / max(len(result['bytes_up']), 1):,.0f}{spent}  "
              f"({result['seconds']:.0f} s)")
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "summary.json").write_text(json.dumps({"config": cfg.as_dict(), "results": results}, indent=1))
    print(f"details: {args.output}/summary.json, {args.output}/*/metrics.json, report.png")
    return 0


def _contenders(cfg, args):
    """``(label, overrides)`` for each ``--strategy`` (rank-aware rules get mixed ranks) and ``--variant``."""
    from fedfm.strategies import STRATEGIES

    ranks = [int(rank) for rank in args.mixed_ranks.split(",")]
    for spec in args.strategy:
        name, _, params = spec.partition(":")
        overrides = {"strategy.name": name, "strategy.params": json.loads(params) if params else {}}
        label = spec
        if STRATEGIES[name].mixed_ranks:
            clients = [{"name": client, "lora_r": ranks[index % len(ranks)]}
                       for index, client in enumerate(cfg.client_names)]
            overrides["clients"] = clients
            label = f"{spec} (ranks {','.join(str(c['lora_r']) for c in clients)})"
        yield label, overrides
    for spec in args.variant:
        label, _, overrides = spec.partition(":")
        yield label, json.loads(overrides) if overrides else {}


def _round_printer(stream):
    """An event callback for run_local, which redirects stdout to run.log while it runs."""
    def on_event(event: dict) -> None:
        if event["event"] == "finished" and event["step"] == "evaluate":
            stream.write(f"  round {event['round']:2d}: accuracy {event['accuracy']:.4f}  loss {event['loss']:.4f}\n")
        elif event["event"] == "failed":
            stream.write(f"  {event['step']} failed: {event['error']}\n")
        stream.flush()
    return on_event


if __name__ == "__main__":
    sys.exit(main())
