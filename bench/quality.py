"""Federated quality on real data: against the centralized baseline, for the defaults and for any rule or variant.

    python bench/quality.py [--data ../shared/data/ag_news_test.csv] [--text-column title,description]
        [--label-column label] [--rounds 10] [--clients 8] [--alpha 0.3] [--engine simulate] [--diagnose]
    python bench/quality.py --data ../shared/data/clinc150_train.csv --text-column text --engine simulate
    python bench/quality.py --strategy fedadam --strategy 'fedyogi:{"eta": 0.01}' --strategy flexlora
    python bench/quality.py --variant 'random-head:{"head.init": "random", "head.aggregation": "samples"}'

Setup (issue #15): any CSV (``--data``, ``--text-column``, ``--label-column``; AG News from
``../shared/data/`` by default), all-MiniLM-L6-v2 + LoRA, ``--clients`` tenants with Dirichlet(``--alpha``)
label skew, each tenant's rows split 80/20 into train/eval (the union of the eval splits is the global
test set), ``--rounds`` rounds. Training uses the library's defaults: pass ``--local-steps``,
``--local-epochs``, ``--batch-size``, ``--learning-rate``, ``--max-length`` or ``--lora-r`` to override them.

Every invocation runs the centralized baseline once: every tenant's training rows pooled into one
client that runs the same total number of optimizer steps (the tenants' steps added up, per round),
evaluated on the same rows. Then FedAvg with the defaults, and each ``--strategy NAME[:PARAMS_JSON]``
and ``--variant LABEL:OVERRIDES_JSON`` (dotted config paths over the defaults; repeatable), on the same
tenants, data and budget. It prints accuracy per round side by side with the optimizer steps behind it,
and each run's final accuracy over the centralized one (target ≥ 0.98). Rank-aware rules (hetlora,
flexlora, flora) get mixed client ranks (``--mixed-ranks``, cycled over the clients).
``--engine pipeline`` (default) runs through the local KFP pipeline as ``fedfm run`` does;
``--engine simulate`` runs in process as ``fedfm simulate`` does (same results, less overhead), and with
``--diagnose`` prints where the default run's classification head went (``bench/head_diagnosis.py``).
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
AG_NEWS_TEXT = "title,description"

# the training options; None leaves the library's default
TRAINING_OPTIONS = {"local_steps": ("training.local_steps", int), "local_epochs": ("training.local_epochs", float),
                    "batch_size": ("training.batch_size", int), "learning_rate": ("training.learning_rate", float),
                    "max_length": ("model.max_length", int), "lora_r": ("lora.r", int)}


def add_setup_arguments(parser: argparse.ArgumentParser, *, clients: int = 8, training: dict | None = None) -> None:
    """The options of the benchmark federation (data, federation size, training budget) that
    :func:`bench_config` reads; other benches (``robust.py``) share them and may fix their own ``training``
    defaults (otherwise the library's apply)."""
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--text-column", default=None,
                        help=f"text column(s), comma-separated (default: {AG_NEWS_TEXT} for AG News, else text)")
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--clients", type=int, default=clients)
    parser.add_argument("--alpha", type=float, default=0.3)
    for option, (_, kind) in TRAINING_OPTIONS.items():
        parser.add_argument(f"--{option.replace('_', '-')}", type=kind, default=(training or {}).get(option),
                            help="default: the library's" if option not in (training or {}) else None)
    parser.add_argument("--seed", type=int, default=0)


def data_missing(args, bench: str) -> bool:
    """Say so on stderr when the data file is not where ``--data`` points."""
    if args.data.exists():
        return False
    print(f"{bench}: no data at {args.data} (the benchmark datasets live in ../shared/data/ beside the "
          "repository and are never committed); pass --data PATH", file=sys.stderr)
    return True


def bench_config(args):
    """The benchmark federation on ``args.data`` (labels resolved from the data), from
    :func:`add_setup_arguments`' options: the library's defaults but for the training options given."""
    from fedfm.config import FederationConfig
    from fedfm.data import resolve_labels

    text = args.text_column or (AG_NEWS_TEXT if args.data.resolve() == DEFAULT_DATA.resolve() else "text")
    name = re.sub(r"[^a-z0-9-]+", "-", args.data.stem.lower()).strip("-")[:40] or "bench"
    cfg = FederationConfig.parse({
        "name": name,
        "model": {"name_or_path": "sentence-transformers/all-MiniLM-L6-v2"},
        "task": "classification",
        "data": {"source": str(args.data), "text_column": text, "label_column": args.label_column,
                 "partition": f"dirichlet:{args.alpha}", "eval_fraction": 0.2},
        "clients": args.clients,
        "rounds": args.rounds,
        "seed": args.seed,
    })
    overrides = {path: getattr(args, option) for option, (path, _) in TRAINING_OPTIONS.items()
                 if getattr(args, option) is not None}
    if args.lora_r is not None:
        overrides["lora.alpha"] = 2 * args.lora_r
    return resolve_labels(cfg.with_overrides(overrides))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/quality.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_setup_arguments(parser)
    parser.add_argument("--strategy", action="append", default=[], metavar="NAME[:PARAMS_JSON]",
                        help="also run these rules (repeatable), each against the centralized baseline")
    parser.add_argument("--variant", action="append", default=[], metavar="LABEL:OVERRIDES_JSON",
                        help="also run these config variants (dotted-path overrides, repeatable)")
    parser.add_argument("--mixed-ranks", default="4,8,16", help="LoRA ranks cycled over the clients for "
                                                                "rank-aware rules")
    parser.add_argument("--only", action="append", default=[], metavar="LABEL",
                        help="run only these (centralized, defaults, a strategy or variant label; repeatable); results "
                             "merge into OUTPUT/summary.json, so invocations can run side by side on one OUTPUT")
    parser.add_argument("--engine", choices=["pipeline", "simulate"], default="pipeline")
    parser.add_argument("--diagnose", action="store_true", help="with --engine simulate: where the default run's "
                                                                "head went, round by round")
    parser.add_argument("--output", type=Path,
                        default=ROOT / "runs" / f"bench-quality-{time.strftime('%Y%m%d-%H%M%S')}")
    args = parser.parse_args(argv)
    if args.diagnose and args.engine != "simulate":
        parser.error("--diagnose reads the clients' updates, which only --engine simulate keeps")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if data_missing(args, "bench/quality.py"):
        return 2

    cfg = bench_config(args)
    describe_setup(cfg, args.data)
    if args.engine == "simulate":  # in process, without KFP (same signature as run_local)
        from fedfm.simulation import simulate as run
    else:
        from fedfm.pipelines.local_runner import run_local as run
    return compare(cfg, args, run)


def describe_setup(cfg, data: Path) -> None:
    """Print the data file, the labels and each tenant's rows."""
    from fedfm.data import describe_clients

    labels = cfg.data.labels
    print(f"data: {data}; {len(labels)} labels: {', '.join(labels[:12])}{' ...' if len(labels) > 12 else ''}")
    print(f"training: {cfg.training.local_steps or cfg.training.local_epochs} "
          f"{'steps' if cfg.training.local_steps else 'epochs'} per round, batch {cfg.training.batch_size}, "
          f"learning rate {cfg.training.learning_rate}, LoRA r {cfg.lora.r}; head: init {cfg.head.init}, "
          f"aggregation {cfg.head.aggregation}; strategy {cfg.strategy.name}")
    for client, info in describe_clients(cfg).items():
        held = sum(1 for count in info["labels"].values() if count) if isinstance(info["labels"], dict) else "?"
        print(f"  {client}: train {info['train']:5d} eval {info['eval']:5d}  classes held {held}")


def compare(cfg, args, run) -> int:
    """The centralized baseline, the defaults, each ``--strategy`` and ``--variant``: accuracy per round
    with the optimizer steps behind it (per client and in all), and each final over the centralized one."""
    summary_path = args.output / "summary.json"
    results = json.loads(summary_path.read_text())["results"] if summary_path.exists() else {}
    for index, (label, overrides) in enumerate([("centralized", {"centralized": True}), ("defaults", {}),
                                                *_contenders(cfg, args)]):
        if args.only and label not in args.only:
            continue
        name = re.sub(r"[^a-z0-9.=-]+", "-", label.split(" ")[0].lower())
        run_cfg = cfg.with_overrides(overrides)
        print(f"\n== {label}: {len(run_cfg.training_clients)} training client(s), {cfg.rounds} rounds")
        started = time.time()
        history = run(run_cfg, args.output / f"{index}-{name}", on_event=_round_printer(sys.stdout)).history
        accuracy = [record["eval"]["global"]["accuracy"] for record in history]
        steps = [[figures.get("steps", 0) for figures in record.get("clients", {}).values()] for record in history]
        results[label] = {"accuracy": accuracy, "final_accuracy": accuracy[-1], "best_accuracy": max(accuracy),
                          "steps_per_client": [max(s, default=0) for s in steps],
                          "steps_in_all": [sum(s) for s in steps], "seconds": time.time() - started,
                          "bytes_up": [r["bytes_up"] for r in history[1:]], "dir": str(args.output / f"{index}-{name}")}
        if "privacy" in history[-1]:
            results[label]["epsilon"] = history[-1]["privacy"]["epsilon"]
        if summary_path.exists():  # what another invocation on this OUTPUT finished meanwhile
            results = {**json.loads(summary_path.read_text())["results"], **results}
        args.output.mkdir(parents=True, exist_ok=True)
        summary_path.write_text(json.dumps({"config": cfg.as_dict(), "results": results}, indent=1))
    if "centralized" not in results:
        print(f"no centralized run in {summary_path} yet: run with --only centralized to compare")
        return 0
    central = results["centralized"]
    labels = list(results)
    rows = max(len(result["accuracy"]) for result in results.values())  # a privacy budget may allow fewer rounds
    print("\naccuracy per round (steps: each client's optimizer steps that round / all clients' steps)")
    print("round  " + "  ".join(f"{label.split(' ')[0][:14]:>14}" for label in labels))
    for index in range(rows):
        cells = []
        for label in labels:
            result = results[label]
            cells.append(f"{result['accuracy'][index]:14.4f}" if index < len(result["accuracy"]) else f"{'-':>14}")
        print(f"{index:5d}  " + "  ".join(cells))
        if index:
            print("steps  " + "  ".join(
                f"{results[label]['steps_per_client'][index]:>6}/{results[label]['steps_in_all'][index]:<7}"
                if index < len(results[label]["accuracy"]) else f"{'':>14}" for label in labels))
    print()
    for label, result in results.items():
        result["ratio"] = result["final_accuracy"] / central["final_accuracy"]
        spent = f"  ε {result['epsilon']:.3f}" if "epsilon" in result else ""
        verdict = "" if label == "centralized" else f"  ratio {result['ratio']:.4f} " + (
            "(>= 0.98: met)" if result["ratio"] >= 0.98 else "(>= 0.98: NOT met)")
        print(f"{label:40s} final {result['final_accuracy']:.4f}  best {result['best_accuracy']:.4f}{verdict}  "
              f"bytes up/round {sum(result['bytes_up']) / max(len(result['bytes_up']), 1):,.0f}{spent}  "
              f"({result['seconds']:.0f} s)")
    print(f"details: {args.output}/summary.json, {args.output}/*/metrics.json, report.png")
    if getattr(args, "diagnose", False) and "defaults" in results:
        from head_diagnosis import diagnose

        print("\nthe default run's head, round by round (bench/head_diagnosis.py):")
        diagnose(Path(results["defaults"]["dir"]))
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
