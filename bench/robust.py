"""Byzantine robustness on AG News: FedAvg and the robust preset against attacking clients, beside a clean run.

    python bench/robust.py [--rounds 10] [--local-steps 30] [--clients 10] [--attack-share 0.2]
        [--attack sign-flip:10 --attack scale:100 --attack nan] [--only clean,sign-flip] [--output DIR]
    python bench/robust.py --dry-run    # the runs, their config overrides and the attackers; trains nothing

Setup: bench/quality.py's (all-MiniLM-L6-v2 + LoRA, Dirichlet(0.3) label skew, each tenant's rows
split 80/20 into train/eval, 10 rounds of 30 local steps of batch 16), with 10 tenants, of which
``--attack-share`` (default 20 %: 2 tenants, drawn from ``--seed`` by ``fedfm.attacks.choose_attackers``)
attack in every round they take part in. All runs share the data, the tenants and the attackers,
and run in this process through ``fedfm.simulation.simulate`` (as ``fedfm simulate`` does):

- ``clean``: FedAvg, nobody attacks;
- ``clean/robust``: the robust preset, nobody attacks (what the defence itself costs);
- ``honest-only``: FedAvg over the honest clients alone, as if the attackers were simply not there
  (their data leaves with them, whatever the defence). The attackers send NaN updates, which are
  rejected as invalid (``policy.invalid_updates: reject``); nothing else is checked;
- for each ``--attack`` (default ``sign-flip:10``, ``scale:100``, ``nan``; any form ``fedfm simulate
  --attack`` takes, see ``fedfm.attacks``): ``ATTACK/fedavg``, FedAvg without update checks, and
  ``ATTACK/robust``, the robust preset (``policy.preset: robust``).

Prints each run's final global accuracy and its difference to the clean run in percentage points,
and per attack whether "robust within 2 pt of clean" holds. A run that stops because a round failed
(FedAvg refuses a NaN update, and the round fails with it) shows as "failed at round N: <message>";
the other runs go on. ``--only SELECTOR`` (repeatable, or comma-separated) runs a subset: a run's
name (``nan/robust``, ``honest-only``), an attack (``nan``, ``sign-flip:10``), a defence (``fedavg``,
``robust``) or ``clean`` (keep it: the differences are to it). Everything lands in ``--output``: a directory per
run (``metrics.json``, ``report.png``, ``run.log``) and ``summary.json``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))  # quality.py beside this file, however it is started

from quality import ROOT, _round_printer, add_setup_arguments, bench_config, data_missing, describe_setup  # noqa: E402

from fedfm.attacks import Attack, choose_attackers, parse_attack  # noqa: E402
from fedfm.errors import ConfigError  # noqa: E402

#: The config overrides (dotted paths) of each defence: the one place a run's config is decided.
DEFENCES: dict[str, dict[str, Any]] = {
    "fedavg": {"strategy.name": "fedavg"},  # the setup's FedAvg, without update checks (their default: off)
    "checks": {"policy.preset": "checks"},  # the checks with the setup's FedAvg
    "robust": {"policy.preset": "robust"},
}
CLEAN = "clean"
HONEST_ONLY = "honest-only"
DEFAULT_ATTACKS = ("sign-flip:10", "scale:100", "nan")
# the training budget the figures in bench/README.md were measured with (the library's defaults otherwise)
ROBUST_TRAINING = {"local_steps": 30, "batch_size": 16, "learning_rate": 2e-3, "max_length": 64, "lora_r": 8}
TOLERANCE_PT = 2.0  # "robust within 2 pt of clean"
MESSAGE_WIDTH = 110  # a failure's message in the table; summary.json keeps it whole


@dataclass(frozen=True)
class Run:
    """One federation of the benchmark: who attacks how, and the config overrides of its defence."""

    name: str
    attack: Attack | None
    defence: str
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def attack_label(self) -> str:
        return self.attack.spec if self.attack else CLEAN


def plan(attacks: list[Attack], only: list[str] | None = None) -> list[Run]:
    """The runs: clean FedAvg, then every attack under every defence; ``only`` keeps the runs some
    selector names (a run's name, an attack's spec or kind, a defence, ``clean``). ValueError for a
    selector that names no run."""
    runs = [Run(CLEAN, None, "fedavg", DEFENCES["fedavg"]),
            Run(f"{CLEAN}/robust", None, "robust", DEFENCES["robust"]),
            # the attackers' NaN updates are rejected as invalid, and nothing else is checked: FedAvg over the
            # honest clients, with the same tenants, data and draws (no quorum: the attackers never count)
            Run(HONEST_ONLY, Attack("nan"), HONEST_ONLY, {**DEFENCES["fedavg"], "policy.invalid_updates": "reject",
                                                          "policy.min_clients": 1})]
    for attack in attacks:
        runs += [Run(f"{attack.spec}/{defence}", attack, defence, overrides) for defence, overrides in DEFENCES.items()]
    if not only:
        return runs

    def names(run: Run) -> set[str]:
        if run.defence == HONEST_ONLY:
            return {HONEST_ONLY}
        if run.attack is None:
            return {run.name} if run.name == CLEAN else {run.name, run.defence}
        return {run.name, run.defence, run.attack.spec, run.attack.kind}

    unknown = [selector for selector in only if not any(selector in names(run) for run in runs)]
    if unknown:
        raise ValueError(f"--only {', '.join(unknown)} names no run; the runs: {', '.join(run.name for run in runs)} "
                         f"(or an attack, {', '.join(DEFENCES)}, {CLEAN})")
    return [run for run in runs if names(run) & set(only)]


def failed_round(output: Path) -> int | None:
    """The round of the step that stopped the run in ``output``, from its ``events.jsonl`` (a client's
    failed fine-tune does not stop a run; the round's aggregate or evaluation does)."""
    from fedfm import events

    seen, _ = events.read(output / "events.jsonl")
    failed = [event for event in seen if event["event"] == "failed" and event.get("step") != "client_finetune"]
    for event in failed + [event for event in reversed(seen) if event["event"] == "started"]:
        if "round" in event:
            return int(event["round"])
    return None


def _partial_accuracy(output: Path) -> list[float]:
    """The global accuracy of the rounds a failed run completed (its last ``history.json``)."""
    histories = sorted((output / "work").glob("round-*/history.json"), key=lambda path: int(path.parent.name[6:]))
    if not histories:
        return []
    return [record["eval"]["global"]["accuracy"] for record in json.loads(histories[-1].read_text())]


def run_one(run: Run, cfg, attackers: list[str], output: Path, simulate: Callable[..., Any]) -> dict[str, Any]:
    """Run one federation; a failure is the result, not an exception."""
    result: dict[str, Any] = {"attack": run.attack_label, "defence": run.defence, "overrides": run.overrides,
                              "attackers": attackers if run.attack else [], "final_accuracy": None, "failed": None}
    options = {"attack": run.attack, "attackers": attackers} if run.attack else {}
    started = time.time()
    try:
        history = simulate(cfg, output, on_event=_round_printer(sys.stdout), **options).history
    except Exception as exc:  # a failed round ends this run, not the benchmark
        round_index = failed_round(output)
        message = str(exc).strip() or type(exc).__name__
        result["failed"] = f"failed at round {round_index if round_index is not None else '?'}: {message}"
        result["accuracy"] = _partial_accuracy(output)
        print(f"  {result['failed']}")
    else:
        result["accuracy"] = [record["eval"]["global"]["accuracy"] for record in history]
        result["final_accuracy"] = result["accuracy"][-1]
    result["seconds"] = time.time() - started
    return result


def _difference_pt(result: dict[str, Any], clean: dict[str, Any] | None) -> float | None:
    if result["final_accuracy"] is None or clean is None or clean["final_accuracy"] is None:
        return None
    return 100.0 * (result["final_accuracy"] - clean["final_accuracy"])


def _short(text: str, width: int = MESSAGE_WIDTH) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """Final accuracy per run and its difference to the clean run, in percentage points."""
    clean = results.get(CLEAN)
    width = max([len("run")] + [len(name) for name in results])
    lines = [f"{'run':{width}}  {'attackers':>9}  {'final acc':>9}  {'vs clean':>9}  {'s':>6}"]
    for name, result in results.items():
        attackers = f"{len(result['attackers'])}" if result["attackers"] else "-"
        seconds = f"{result.get('seconds', 0):6.0f}"
        if result["failed"]:
            lines.append(f"{name:{width}}  {attackers:>9}  {_short(result['failed'])}  ({seconds.strip()} s)")
            continue
        difference = _difference_pt(result, clean)
        shown = "" if name == CLEAN else ("n/a" if difference is None else f"{difference:+.1f} pt")
        lines.append(f"{name:{width}}  {attackers:>9}  {result['final_accuracy']:9.4f}  {shown:>9}  {seconds}")
    return "\n".join(lines)


def verdicts(results: dict[str, dict[str, Any]], tolerance_pt: float = TOLERANCE_PT) -> dict[str, dict[str, Any]]:
    """Per attack with a robust run: whether it ends within ``tolerance_pt`` of the clean run's final
    accuracy (``holds``: True, False, or None when there is no clean accuracy to compare with)."""
    clean = results.get(CLEAN)
    found: dict[str, dict[str, Any]] = {}
    for result in results.values():
        if result["defence"] != "robust" or result["attack"] == CLEAN:
            continue
        difference = _difference_pt(result, clean)
        if clean is None or clean["failed"]:
            holds, why = None, "no clean accuracy to compare with" + (f" (clean {clean['failed']})" if clean else "")
        elif result["failed"]:
            holds, why = False, f"robust {result['failed']}"
        else:
            holds = difference >= -tolerance_pt - 1e-9  # -2.0 shown is -2.0, whatever the float noise
            why = f"robust {result['final_accuracy']:.4f}, {difference:+.1f} pt"
        fedavg = next((other for other in results.values()
                       if other["attack"] == result["attack"] and other["defence"] == "fedavg"), None)
        if fedavg is not None and holds is not None:
            fedavg_difference = _difference_pt(fedavg, clean)
            why += ("; fedavg " + _short(fedavg["failed"], 60) if fedavg["failed"] else
                    f"; fedavg {fedavg['final_accuracy']:.4f}, {fedavg_difference:+.1f} pt")
        honest = results.get(HONEST_ONLY)
        if honest is not None and honest["final_accuracy"] is not None and holds is not None:
            why += f"; {HONEST_ONLY} {honest['final_accuracy']:.4f}, {_difference_pt(honest, clean):+.1f} pt"
        found[result["attack"]] = {"holds": holds, "why": why, "difference_pt": difference}
    return found


def format_verdicts(results: dict[str, dict[str, Any]], tolerance_pt: float = TOLERANCE_PT) -> str:
    clean = results.get(CLEAN)
    against = (f" ({clean['final_accuracy']:.4f})" if clean and clean["final_accuracy"] is not None else "")
    lines = [f"robust within {tolerance_pt:g} pt of clean{against}:"]
    found = verdicts(results, tolerance_pt)
    if not found:
        lines.append("  (no robust run)")
    width = max([len(attack) for attack in found] + [0])
    for attack, verdict in found.items():
        said = {True: "holds", False: "does NOT hold", None: "cannot tell"}[verdict["holds"]]
        lines.append(f"  {attack:{width}}  {said:13}  ({verdict['why']})")
    return "\n".join(lines)


def defences_in_effect(cfg) -> str:
    """What a run's config does with bad updates, as it will run (the rule, validation failures, checks)."""
    strategy, policy = cfg.strategy, cfg.policy
    checks = policy.update_checks
    rule = strategy.name + (json.dumps(strategy.params) if strategy.params else "")
    bound = "off" if checks.norm_mads is None else f"median + {checks.norm_mads:g} MAD, {checks.action}"
    return (f"rule {rule}, invalid updates: {policy.invalid_updates}, norm check: {bound}, "
            f"clip to median: {getattr(checks, 'clip_to_median', 'n/a')}")


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9.=-]+", "-", name.lower()).strip("-")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/robust.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_setup_arguments(parser, clients=10, training=ROBUST_TRAINING)
    parser.add_argument("--attack-share", type=float, default=0.2, metavar="SHARE",
                        help="attackers: a fraction in (0, 1) of the clients, or a count >= 1 (default 0.2)")
    parser.add_argument("--attack", action="append", default=[], metavar="KIND[:SCALE]",
                        help=f"attacks to run (repeatable; default {' '.join(DEFAULT_ATTACKS)})")
    parser.add_argument("--only", action="append", default=[], metavar="SELECTOR",
                        help="run only these (repeatable or comma-separated): a run's name (nan/robust), an attack "
                             "(nan), a defence (fedavg, robust) or clean")
    parser.add_argument("--dry-run", action="store_true", help="print the runs, overrides and attackers; train nothing")
    parser.add_argument("--output", type=Path,
                        default=ROOT / "runs" / f"bench-robust-{time.strftime('%Y%m%d-%H%M%S')}")
    args = parser.parse_args(argv)
    try:
        args.attacks = [parse_attack(text) for text in (args.attack or DEFAULT_ATTACKS)]
        args.runs = plan(args.attacks, [part.strip() for text in args.only for part in text.split(",") if part.strip()])
    except (ConfigError, ValueError) as exc:
        parser.error(str(exc))
    return args


def _takes_attacks(simulate: Callable[..., Any]) -> bool:
    return {"attack", "attackers"} <= set(inspect.signature(simulate).parameters)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if data_missing(args, "bench/robust.py"):
        return 2
    from fedfm.simulation import simulate

    cfg = bench_config(args)
    try:
        attackers = choose_attackers(cfg.client_names, args.attack_share, args.seed)
    except ConfigError as exc:
        print(f"bench/robust.py: {exc}", file=sys.stderr)
        return 2
    describe_setup(cfg, args.data)
    print(f"attackers ({args.attack_share:g} of {len(cfg.client_names)}, seed {args.seed}): {', '.join(attackers)}")

    configs, bad = {}, []  # every run's config up front: a bad override fails now, not after an hour of training
    for run in args.runs:
        try:
            configs[run.name] = cfg.with_overrides(run.overrides)
        except ConfigError as exc:
            bad.append(f"{run.name}: overrides {run.overrides}: {exc}")
    if any(run.attack for run in args.runs) and not _takes_attacks(simulate):
        bad.append("fedfm.simulation.simulate takes no attack=/attackers= arguments in this checkout")
    if args.dry_run:
        for run in args.runs:
            who = ", ".join(attackers) if run.attack else "nobody"
            print(f"  {run.name:22s} attack {run.attack_label:12s} by {who}; overrides {json.dumps(run.overrides)}")
            if run.name in configs:
                print(f"  {'':22s} in effect: {defences_in_effect(configs[run.name])}")
    for problem in bad:
        print(f"bench/robust.py: {problem}", file=sys.stderr)
    if bad or args.dry_run:
        return 2 if bad else 0

    results: dict[str, dict[str, Any]] = {}
    for index, run in enumerate(args.runs):
        who = f" by {', '.join(attackers)}" if run.attack else ""
        print(f"\n== {run.name}: attack {run.attack_label}{who}; overrides {json.dumps(run.overrides)}")
        print(f"   in effect: {defences_in_effect(configs[run.name])}")
        results[run.name] = run_one(run, configs[run.name], attackers, args.output / f"{index}-{_slug(run.name)}",
                                    simulate)

    print()
    print(format_table(results))
    print()
    print(format_verdicts(results))
    args.output.mkdir(parents=True, exist_ok=True)
    summary = {"config": cfg.as_dict(), "attack_share": args.attack_share, "attackers": attackers,
               "tolerance_pt": TOLERANCE_PT, "results": results, "verdicts": verdicts(results)}
    (args.output / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(f"details: {args.output}/summary.json, {args.output}/*/metrics.json, report.png, run.log")
    return 0


if __name__ == "__main__":
    sys.exit(main())
