"""bench/robust.py without training: its runs, options, failure handling and printed table on fake results."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from fedfm.attacks import Attack
from fedfm.errors import AdapterValidationError

BENCH = Path(__file__).resolve().parents[2] / "bench" / "robust.py"


@pytest.fixture(scope="module")
def robust():
    spec = importlib.util.spec_from_file_location("bench_robust", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_robust"] = module
    spec.loader.exec_module(module)
    return module


def test_the_default_runs_and_their_overrides(robust):
    args = robust.parse_args([])
    assert args.clients == 10 and args.attack_share == 0.2 and not args.dry_run
    assert [attack.spec for attack in args.attacks] == ["sign-flip:10", "scale:100", "nan"]
    attacked = [f"{attack}/{defence}" for attack in ("sign-flip:10", "scale:100", "nan")
                for defence in ("fedavg", "checks", "robust")]
    assert [run.name for run in args.runs] == ["clean", "clean/robust", "honest-only", *attacked]
    overrides = {run.name: run.overrides for run in args.runs}
    assert overrides["clean"] == overrides["nan/fedavg"] == {"strategy.name": "fedavg"}
    assert overrides["scale:100/robust"] == overrides["clean/robust"] == {"policy.preset": "robust"}
    assert overrides["nan/checks"] == {"policy.preset": "checks"}
    # honest-only: FedAvg where the attackers' updates are NaN and rejected as invalid, nothing else checked
    assert overrides["honest-only"] == {"strategy.name": "fedavg", "policy.invalid_updates": "reject",
                                        "policy.min_clients": 1}
    assert args.runs[2].attack == Attack("nan")
    assert all(run.attack is None for run in args.runs[:2]) and all(run.attack for run in args.runs[2:])


def test_only_selects_runs_by_name_attack_or_defence(robust):
    attacks = [Attack("sign-flip"), Attack("nan")]
    names = lambda only: [run.name for run in robust.plan(attacks, only)]  # noqa: E731
    assert names(["clean", "nan"]) == ["clean", "nan/fedavg", "nan/checks", "nan/robust"]
    assert names(["robust"]) == ["clean/robust", "sign-flip:10/robust", "nan/robust"]
    assert names(["honest-only", "clean"]) == ["clean", "honest-only"]
    assert names(["sign-flip"]) == names(["sign-flip:10"]) == ["sign-flip:10/fedavg", "sign-flip:10/checks",
                                                               "sign-flip:10/robust"]
    assert names(["nan/robust"]) == ["nan/robust"]
    with pytest.raises(ValueError, match="--only scale names no run"):
        robust.plan(attacks, ["scale"])
    args = robust.parse_args(["--only", "clean, nan", "--only", "robust", "--attack", "nan", "--attack", "gaussian:0.5",
                              "--rounds", "3", "--local-steps", "5", "--attack-share", "2", "--output", "/tmp/x"])
    assert [run.name for run in args.runs] == ["clean", "clean/robust", "nan/fedavg", "nan/checks", "nan/robust",
                                               "gaussian:0.5/robust"]
    assert args.rounds == 3 and args.local_steps == 5 and args.attack_share == 2.0 and args.output == Path("/tmp/x")


def test_bad_options_end_with_a_usage_error(robust, capsys):
    for argv in (["--attack", "flood"], ["--only", "krum"]):
        with pytest.raises(SystemExit) as caught:
            robust.parse_args(argv)
        assert caught.value.code == 2
    assert "attack 'flood' is not a known attack" in capsys.readouterr().err


def test_help(robust, capsys):
    with pytest.raises(SystemExit) as caught:
        robust.main(["--help"])
    assert caught.value.code == 0
    shown = capsys.readouterr().out
    for option in ("--rounds", "--local-steps", "--clients", "--attack-share", "--only", "--output", "--dry-run"):
        assert option in shown


def _result(attack, defence, accuracy=None, failed=None):
    return {"attack": attack, "defence": defence, "overrides": {}, "attackers": [] if attack == "clean" else ["a", "b"],
            "final_accuracy": accuracy, "failed": failed, "accuracy": [] if accuracy is None else [0.25, accuracy],
            "seconds": 12.0}


FAKE = {
    "clean": _result("clean", "fedavg", 0.8700),
    "sign-flip:10/fedavg": _result("sign-flip:10", "fedavg", 0.2500),
    "sign-flip:10/robust": _result("sign-flip:10", "robust", 0.8560),
    "scale:100/fedavg": _result("scale:100", "fedavg", 0.3100),
    "scale:100/robust": _result("scale:100", "robust", 0.8400),
    "nan/fedavg": _result("nan", "fedavg", failed="failed at round 1: client tenant-6's tensor x has 12 non-finite "
                                                  "values (NaN/inf)"),
    "nan/robust": _result("nan", "robust", failed="failed at round 4: too few updates"),
}


def test_the_table_and_verdicts_on_fake_results(robust):
    table = robust.format_table(FAKE).splitlines()
    assert table[0].split() == ["run", "attackers", "final", "acc", "vs", "clean", "s"]
    rows = {line.split()[0]: line for line in table[1:]}
    assert rows["clean"].split()[1:3] == ["-", "0.8700"]
    assert rows["sign-flip:10/fedavg"].split()[1:5] == ["2", "0.2500", "-62.0", "pt"]
    assert rows["sign-flip:10/robust"].split()[2:5] == ["0.8560", "-1.4", "pt"]
    assert "failed at round 1: client tenant-6's tensor x has 12 non-finite values (NaN/inf)" in rows["nan/fedavg"]

    found = robust.verdicts(FAKE)
    assert {attack: verdict["holds"] for attack, verdict in found.items()} == {
        "sign-flip:10": True, "scale:100": False, "nan": False}
    assert found["scale:100"]["difference_pt"] == pytest.approx(-3.0)
    said = robust.format_verdicts(FAKE)
    assert said.splitlines()[0] == "robust within 2 pt of clean (0.8700):"
    assert "sign-flip:10  holds" in said and "scale:100     does NOT hold" in said
    assert "robust failed at round 4: too few updates; fedavg failed at round 1" in said
    with_honest = {**FAKE, "honest-only": _result("nan", "honest-only", 0.8600)}
    assert "robust 0.8560, -1.4 pt; fedavg 0.2500, -62.0 pt; honest-only 0.8600, -1.0 pt" in \
        robust.format_verdicts(with_honest)
    assert robust.verdicts(with_honest).keys() == found.keys()  # a reference is not an attack to judge


def test_verdicts_without_a_clean_accuracy_cannot_tell(robust):
    results = {name: result for name, result in FAKE.items() if name != "clean"}
    assert all(verdict["holds"] is None for verdict in robust.verdicts(results).values())
    assert "n/a" in robust.format_table(results)
    results["clean"] = _result("clean", "fedavg", failed="failed at round 2: boom")
    assert "cannot tell" in robust.format_verdicts(results)


def test_a_failed_round_is_reported_not_raised(robust, tmp_path):
    """The run's own events say which round failed; the other runs go on."""
    calls = []

    def simulate(cfg, output, on_event=None, **options):
        calls.append(options)
        output.mkdir(parents=True)
        lines = [{"event": "started", "step": "aggregate", "round": 1},
                 {"event": "finished", "step": "aggregate", "round": 1},
                 {"event": "failed", "step": "client_finetune", "client": "tenant-2", "round": 2, "error": "x"},
                 {"event": "started", "step": "aggregate", "round": 2},
                 {"event": "failed", "step": "aggregate", "round": 2, "error": "AdapterValidationError: ..."}]
        (output / "events.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
        (output / "work" / "round-1").mkdir(parents=True)
        (output / "work" / "round-1" / "history.json").write_text(json.dumps(
            [{"eval": {"global": {"accuracy": 0.25}}}, {"eval": {"global": {"accuracy": 0.5}}}]))
        raise AdapterValidationError("client tenant-6's tensor x has 12 non-finite values (NaN/inf)")

    run = robust.Run("nan/fedavg", Attack("nan"), "fedavg", {"strategy.name": "fedavg"})
    result = robust.run_one(run, None, ["tenant-6", "tenant-9"], tmp_path / "run", simulate)
    assert calls == [{"attack": Attack("nan"), "attackers": ["tenant-6", "tenant-9"]}]
    assert result["failed"] == "failed at round 2: client tenant-6's tensor x has 12 non-finite values (NaN/inf)"
    assert result["final_accuracy"] is None and result["accuracy"] == [0.25, 0.5]


def test_a_clean_run_passes_no_attack(robust, tmp_path):
    calls = []

    def simulate(cfg, output, on_event=None, **options):
        calls.append(options)
        history = [{"eval": {"global": {"accuracy": value}}} for value in (0.25, 0.6, 0.8)]
        return SimpleNamespace(history=history)

    result = robust.run_one(robust.Run("clean", None, "fedavg"), None, ["tenant-6"], tmp_path / "run", simulate)
    assert calls == [{}]
    assert result["final_accuracy"] == 0.8 and result["failed"] is None and result["attackers"] == []
