"""``fedfm simulate``: the pipeline's federation in one process, with the base model loaded once."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedfm.errors import ConfigError, QuorumError, TrainingError

pytestmark = pytest.mark.slow


def _shape(value):
    """The keys at every level, with the leaves' types (the values themselves, timings above all, vary)."""
    if isinstance(value, dict):
        return {key: _shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_shape(item) for item in value]
    return "number" if isinstance(value, (int, float)) and not isinstance(value, bool) else type(value).__name__


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6)


def _counting(monkeypatch, cls) -> list:
    """Count ``cls.from_pretrained`` calls (each one a load from disk)."""
    calls, original = [], cls.from_pretrained

    def counted(*args, **kwargs):
        calls.append(args[0] if args else kwargs.get("pretrained_model_name_or_path"))
        return original(*args, **kwargs)

    monkeypatch.setattr(cls, "from_pretrained", counted)
    return calls


def test_simulate_gives_the_pipelines_results_and_files(classification_pipeline_run, tmp_path):
    """The same config through kfp.local and through simulate: the same figures, round by round, the
    same final adapter, and a metrics.json of the same structure.

    Not bit for bit: kfp.local's steps each get a share of the cores (OMP_NUM_THREADS), simulate's clients
    all of them, and CPU kernels sum gradients in a thread-dependent order (float32 rounding, ~1e-8; with
    torch.set_num_threads(1) here as well, the updates are bitwise equal)."""
    from peft import PeftConfig

    from fedfm.simulation import simulate

    cfg, piped, _ = classification_pipeline_run  # shared with test_pipeline (tests/conftest.py)
    seen = []
    simulated = simulate(cfg, tmp_path / "sim", on_event=seen.append)

    assert [r["round"] for r in simulated.history] == [r["round"] for r in piped.history] == [0, 1, 2]
    for ours, theirs in zip(simulated.history, piped.history):
        assert ours["samples"] == theirs["samples"]
        assert ours["missing"] == theirs["missing"] == {}
        for figure in ("loss", "accuracy", "samples"):
            assert _close(ours["eval"]["global"][figure], theirs["eval"]["global"][figure]), (ours["round"], figure)
        assert sorted(ours["eval"]["clients"]) == sorted(theirs["eval"]["clients"]) == cfg.client_names
        for client, figures in theirs["eval"]["clients"].items():
            assert _close(ours["eval"]["clients"][client]["loss"], figures["loss"])
        assert sorted(ours["clients"]) == sorted(theirs["clients"])
        for client, figures in theirs["clients"].items():
            for figure in ("samples", "steps", "train_loss", "loss_first", "loss_last", "update_norm"):
                assert _close(ours["clients"][client][figure], figures[figure]), (ours["round"], client, figure)
            for figure in ("bytes_down", "bytes_up"):  # the files' headers hold timings: a few digits more or less
                assert abs(ours["clients"][client][figure] - figures[figure]) < 100, (ours["round"], client, figure)
        if "train_loss" in theirs:
            assert _close(ours["train_loss"], theirs["train_loss"])
    ours = load_file(simulated.adapter_dir / "adapter_model.safetensors")
    theirs = load_file(piped.adapter_dir / "adapter_model.safetensors")
    assert sorted(ours) == sorted(theirs)
    for name, value in theirs.items():
        torch.testing.assert_close(ours[name], value, rtol=1e-5, atol=1e-6)

    # the same files, and a metrics.json with the same keys at every level
    ours_metrics, theirs_metrics = (json.loads(run.metrics_path.read_text()) for run in (simulated, piped))
    assert _shape(ours_metrics) == _shape(theirs_metrics)
    assert ours_metrics["run"]["runner"] == "simulate" and theirs_metrics["run"]["runner"] == "kfp.local"
    for run, metrics in ((simulated, ours_metrics), (piped, theirs_metrics)):  # each checkpoints into its directory
        assert metrics["config"] == cfg.with_overrides(
            {"execution.checkpoint_uri": str(run.output.resolve() / "checkpoints")}).as_dict()
    assert ours_metrics["rounds"] == simulated.history
    assert simulated.report_path.stat().st_size > 10_000
    assert sorted(p.name for p in simulated.adapter_dir.iterdir()) == sorted(p.name for p in
                                                                             piped.adapter_dir.iterdir())
    assert PeftConfig.from_pretrained(simulated.adapter_dir).r == cfg.lora.r
    assert json.loads((simulated.adapter_dir / "fedfm.json").read_text())["rounds"] == cfg.rounds
    assert (simulated.output / "run.log").exists()

    # the same progress events as the pipeline's steps, in the pipeline's order
    finished = [(e["step"], e.get("round"), e.get("client")) for e in seen if e["event"] == "finished"]
    assert finished == [("init", None, None), ("evaluate", 0, None), ("checkpoint", 0, None),
                        *[("client_finetune", 1, c) for c in cfg.client_names], ("aggregate", 1, None),
                        ("evaluate", 1, None), ("checkpoint", 1, None),
                        *[("client_finetune", 2, c) for c in cfg.client_names], ("aggregate", 2, None),
                        ("evaluate", 2, None), ("checkpoint", 2, None), ("export", None, None)]


def test_many_clients_with_server_state_load_the_model_once(tiny_config, tmp_path, monkeypatch):
    """12 clients, half of them per round, FedAdam: the base model and tokenizer come from disk once, and
    the strategy's state chains from round 1 to round 2."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fedfm.adapters import load_adapter
    from fedfm.federation import aggregate_round
    from fedfm.server_state import load_server_state
    from fedfm.simulation import simulate

    cfg = tiny_config(rounds=2, clients=12, **{"policy.sample_fraction": 0.5, "strategy.name": "fedadam"})
    models = _counting(monkeypatch, AutoModelForSequenceClassification)
    tokenizers = _counting(monkeypatch, AutoTokenizer)
    run = simulate(cfg, tmp_path / "run")
    assert len(models) == 1 and len(tokenizers) == 1  # init, 3 evaluations and 12 fine-tunes share one load

    for round_index in (1, 2):
        record = run.history[round_index]
        assert sorted(record["clients"]) == sorted(cfg.sampled_clients(round_index)) and len(record["clients"]) == 6
        assert all(math.isfinite(figures["train_loss"]) for figures in record["clients"].values())
        assert sorted(record["eval"]["clients"]) == sorted(cfg.client_names)
    assert cfg.sampled_clients(1) != cfg.sampled_clients(2)

    work = run.output / "work"
    assert load_server_state(str(work / "round-1" / "server_state"), "fedadam")["step"] == 1
    assert load_server_state(str(work / "round-2" / "server_state"), "fedadam")["step"] == 2
    # round 2's global adapter is FedAdam over round 2's updates with round 1's moments, not from scratch
    updates = [(client, str(work / "round-2" / "updates" / f"{client}.safetensors"))
               for client in cfg.sampled_clients(2)]  # in the order they trained
    global_1 = str(work / "round-1" / "global_adapter.safetensors")
    global_2 = str(work / "round-2" / "global_adapter.safetensors")
    carried = aggregate_round(cfg, 2, global_1, updates, str(tmp_path / "carried"),
                              state_in=str(work / "round-1" / "server_state"))
    fresh = aggregate_round(cfg, 2, global_1, updates, str(tmp_path / "fresh"))
    assert carried.sha256 == load_adapter(global_2).meta.sha256 != fresh.sha256
    assert run.history[2]["adapter_sha256"] == carried.sha256


def test_a_failing_client_is_missing_and_the_quorum_decides(tiny_config, tmp_path, monkeypatch):
    from fedfm import training
    from fedfm.simulation import simulate

    original = training.train_client

    def flaky(cfg, client, round_index, global_adapter, update_out):
        if client == "tenant-1":
            raise TrainingError("client tenant-1: the disk is full")
        return original(cfg, client, round_index, global_adapter, update_out)

    monkeypatch.setattr(training, "train_client", flaky)
    seen = []
    run = simulate(tiny_config(rounds=1, clients=3, **{"policy.min_clients": 2}), tmp_path / "quorum",
                   on_event=seen.append)
    record = run.history[1]
    assert sorted(record["clients"]) == ["tenant-0", "tenant-2"]
    assert record["missing"] == {"tenant-1": "Failed: TrainingError: client tenant-1: the disk is full"}
    # as the pipeline's step reports a failed Job: the step finished, the client sent nothing
    assert any(e["event"] == "finished" and e["step"] == "client_finetune" and e["client"] == "tenant-1"
               and e["phase"] == "Failed" for e in seen)
    metrics = json.loads(run.metrics_path.read_text())
    assert metrics["rounds"][1]["missing"] == record["missing"]
    assert "the disk is full" in (run.output / "run.log").read_text()  # with its traceback

    with pytest.raises(QuorumError, match=r"round 1: 2 of 3 clients sent an update, below the quorum of 3 .*"
                                          r"tenant-1: Failed: TrainingError: client tenant-1: the disk is full"):
        simulate(tiny_config(rounds=1, clients=3), tmp_path / "no-quorum")


def test_simulate_refuses_a_kubernetes_config_and_a_used_output(tiny_config, tmp_path):
    from fedfm.errors import FedFMError
    from fedfm.simulation import simulate

    # (the labels were read from the data: a cluster config must name them)
    cfg = tiny_config().with_overrides({"execution.mode": "kubernetes", "execution.storage_uri": "s3://bucket/fedfm"})
    with pytest.raises(ConfigError, match="execution.mode is 'kubernetes'"):
        simulate(cfg, tmp_path / "k8s")
    assert not (tmp_path / "k8s").exists()
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "metrics.json").write_text("{}")
    with pytest.raises(FedFMError, match="is not empty; choose a new --output"):
        simulate(tiny_config(), tmp_path / "used")


def test_reused_base_models_build_what_a_fresh_load_builds(tiny_config, monkeypatch):
    """Copies of the kept base model: the same LoRA initialization and fingerprint as a fresh load, and a
    client changing its copy leaves the next one pristine."""
    from transformers import AutoModelForSequenceClassification

    from fedfm.modeling import adapter_tensors, build_model, reuse_base_models

    cfg = tiny_config()
    fresh = build_model(cfg)
    loads = _counting(monkeypatch, AutoModelForSequenceClassification)
    with reuse_base_models():
        first = build_model(cfg)
        with torch.no_grad():
            for parameter in first.model.parameters():
                parameter.add_(1.0)
        second = build_model(cfg)
        other_seed = build_model(cfg.with_overrides({"seed": 5}))
    assert len(loads) == 2  # once per seed: the seed initializes the new head
    for loaded in (first, second):
        assert loaded.fingerprint == fresh.fingerprint and loaded.model is not fresh.model
    expected = adapter_tensors(fresh.model)
    for name, value in adapter_tensors(second.model).items():
        assert torch.equal(value, expected[name]), name
    for (name, ours), theirs in zip(second.model.state_dict().items(), fresh.model.state_dict().values()):
        assert torch.equal(ours, theirs), name
    assert other_seed.fingerprint == fresh.fingerprint
    assert not all(torch.equal(value, expected[name]) for name, value in adapter_tensors(other_seed.model).items())
    build_model(cfg)
    assert len(loads) == 3  # outside the block every build loads again


def test_a_reused_model_trains_bit_for_bit_the_update_a_fresh_load_trains(tiny_config, tmp_path):
    """A Job loads the base model from its checkpoint; `fedfm simulate` trains on copies of one load. CPU
    kernels round float32 sums differently on differently aligned weights (a fresh load's sit at any offset
    of the checkpoint's memory map), and Adam magnifies that: the two must train the same bits."""
    from safetensors.torch import load_file

    from fedfm.federation import initialize
    from fedfm.modeling import build_model, reuse_base_models
    from fedfm.training import train_client

    # a real checkpoint's layers: the tiny model's kernels are too small to round by alignment
    cfg = tiny_config(**{"model.name_or_path": "sentence-transformers/all-MiniLM-L6-v2", "model.max_length": 32,
                         "training.local_steps": 3})
    start = str(tmp_path / "global.safetensors")
    initialize(cfg, start)
    client = cfg.training_clients[0]
    train_client(cfg, client, 1, start, str(tmp_path / "fresh.safetensors"))
    with reuse_base_models():
        build_model(cfg)  # the load the block keeps; the fine-tune gets a copy
        train_client(cfg, client, 1, start, str(tmp_path / "reused.safetensors"))
    fresh, reused = load_file(tmp_path / "fresh.safetensors"), load_file(tmp_path / "reused.safetensors")
    assert sorted(fresh) == sorted(reused)
    for name, value in fresh.items():
        assert torch.equal(value, reused[name]), f"{name}: {(value - reused[name]).abs().max().item():.3g} apart"


def test_cli_simulate(tiny_classifier, tmp_path):
    from typer.testing import CliRunner

    from fedfm.cli import app

    result = CliRunner().invoke(app, [
        "simulate", "--model", tiny_classifier, "--dataset", "builtin:topics", "--max-samples", "200",
        "--clients", "2", "--rounds", "1", "--local-steps", "3", "--lora-r", "2", "--seed", "3",
        "--output", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "global accuracy:" in result.output and "summary" in result.output
    # not a terminal: progress as lines, the progress table and the summary once each
    assert result.output.count("┃ round ┃ tenant-0") == 1 and "\nsummary\n" in result.output
    assert "client_finetune [round 1 tenant-1]: loss" in result.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["run"]["runner"] == "simulate" and metrics["config"]["lora"]["r"] == 2
    assert sorted(metrics["rounds"][1]["clients"]) == ["tenant-0", "tenant-1"]
    assert Path(tmp_path / "run" / "report.png").exists() and (tmp_path / "run" / "adapter").is_dir()
    assert "\x1b[" not in (tmp_path / "run" / "run.log").read_text()  # plain text, whatever the libraries colour

    # issue 18, item 5: a run's progress from its events, finished or not, with how to go on
    shown = CliRunner().invoke(app, ["status", str(tmp_path / "run"), "--follow"])
    assert shown.exit_code == 0, shown.output
    lines = shown.output.splitlines()
    assert "client_finetune [round 1 tenant-0]: loss" in shown.output and "finished: results in" in lines[-1]
    # --follow on a run still going: it prints what comes, and stops when the run has finished
    import threading

    events_file, metrics_file = tmp_path / "run" / "events.jsonl", tmp_path / "run" / "metrics.json"
    every, metrics_text = events_file.read_text().splitlines(keepends=True), metrics_file.read_text()
    events_file.write_text("".join(every[:3]))
    metrics_file.unlink()

    def the_run_goes_on():
        time.sleep(1.5)
        with events_file.open("a") as handle:
            handle.write("".join(every[3:]))
        metrics_file.write_text(metrics_text)

    going_on = threading.Thread(target=the_run_goes_on)
    going_on.start()
    followed = CliRunner().invoke(app, ["status", str(tmp_path / "run"), "--follow"])
    going_on.join()
    assert followed.exit_code == 0 and followed.output == shown.output, followed.output

    metrics_file.unlink()  # as if it had stopped after its last checkpoint
    shown = CliRunner().invoke(app, ["status", str(tmp_path / "run")])
    assert shown.exit_code == 0, shown.output
    assert " ".join(shown.output.split()).endswith(
        f"not finished: rounds 0-1 finished; if it is no longer running, `fedfm simulate --resume "
        f"{tmp_path / 'run'}` goes on from round 2")


def test_ctrl_c_says_how_to_resume(tiny_classifier, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import fedfm.simulation
    from fedfm.cli import app

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fedfm.simulation, "simulate", interrupted)
    result = CliRunner().invoke(app, ["simulate", "--model", tiny_classifier, "--clients", "2", "--rounds", "1",
                                      "--output", str(tmp_path / "run")])
    assert result.exit_code == 130
    said = " ".join((result.output + (result.stderr if hasattr(result, "stderr") else "")).split())
    assert f"interrupted: `fedfm simulate --resume {tmp_path / 'run'}` goes on after the last round" in said


def test_a_run_with_a_privacy_budget_stops_at_it(tiny_config, tmp_path):
    """σ and a target ε that pays for fewer rounds than configured: the run releases exactly the rounds
    the budget pays for, reports ε after each, ends within the target, and exports the last adapter."""
    from fedfm.simulation import simulate
    from fedfm.trust import privacy

    cfg = tiny_config(rounds=6, clients=3, **{"privacy.noise_multiplier": 4.0, "privacy.target_epsilon": 2.5,
                                              "privacy.clip_norm": 0.5, "privacy.noise_seed": 1})
    fit = privacy.rounds_within_budget(cfg)
    assert 1 < fit < 6
    run = simulate(cfg, tmp_path / "budget")
    assert [record["round"] for record in run.history] == list(range(fit + 1))
    spent = [record["privacy"]["epsilon"] for record in run.history[1:]]
    assert spent == sorted(spent) and spent[-1] <= 2.5
    assert privacy.epsilon("rdp", [(1.0, 4.0)] * (fit + 1), cfg.privacy.delta) > 2.5  # one more would not fit
    assert json.loads(run.metrics_path.read_text())["rounds"][-1]["privacy"]["epsilon"] == spent[-1]
    assert (run.output / "adapter" / "adapter_model.safetensors").exists()
