"""kill -9 in the middle of a round, then --resume: the run finishes with the adapter an uninterrupted run
gives, and no checkpointed round is computed again."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fedfm import events

pytestmark = pytest.mark.slow

FEDFM = str(Path(sys.executable).parent / "fedfm")


def _fedfm(*args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([FEDFM, *args], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _killed_mid_round(command: str, config: Path, output: Path, round_index: int) -> None:
    """Start ``fedfm COMMAND``, and kill -9 its whole process group in the middle of ``round_index``: under
    ``fedfm run`` once a client of that round has started its fine-tune (the pipeline's steps of the round are
    under way, its fine-tunes' processes among them), under ``fedfm simulate`` once one has finished it (the
    round's work directory then holds an update, which the resumed run must set aside)."""
    process = subprocess.Popen([FEDFM, command, "-c", str(config), "-o", str(output)], start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    moment = "started" if command == "run" else "finished"
    deadline = time.time() + 600
    try:
        while time.time() < deadline:
            seen = events.read(output / "events.jsonl")[0] if (output / "events.jsonl").exists() else []
            if any(event["event"] == moment and event["step"] == "client_finetune"
                   and event.get("round") == round_index for event in seen):
                break
            assert process.poll() is None, "the run ended before it could be interrupted"
            time.sleep(0.05)
        else:
            pytest.fail(f"round {round_index} never started")
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL


def _snapshot(directory: Path) -> dict[str, tuple[str, int]]:
    return {str(path.relative_to(directory)): (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
            for path in sorted(directory.rglob("*")) if path.is_file()}


def _assert_same_adapter(ours: Path, theirs: Path) -> None:
    mine, reference = load_file(ours / "adapter_model.safetensors"), load_file(theirs / "adapter_model.safetensors")
    assert sorted(mine) == sorted(reference)
    for name, value in reference.items():
        assert (mine[name] - value).abs().max().item() <= 1e-6, name


@pytest.fixture(scope="module")
def uninterrupted(tiny_config, tmp_path_factory):
    """``uninterrupted(secure, rounds)``: the federation these tests interrupt (config file) and its uninterrupted
    run's output. ``fedfm simulate`` runs it for both commands: it gives the pipeline's adapter and metrics (as
    test_simulate and test_secure_aggregation check), in a fraction of a pipeline run's time."""
    runs: dict[tuple[bool, int], tuple[Path, Path]] = {}

    def run(secure: bool, rounds: int) -> tuple[Path, Path]:
        if (secure, rounds) not in runs:
            directory = tmp_path_factory.mktemp("uninterrupted-secure" if secure else "uninterrupted")
            # FedAdam: its moments are server state the resumed rounds must continue from
            cfg = tiny_config(rounds=rounds, clients=3, **{"strategy.name": "fedadam", "strategy.params": {"eta": 0.01},
                                                           "secure_aggregation.enabled": secure})
            config = directory / "federation.yaml"
            config.write_text(yaml.safe_dump(cfg.as_dict()))
            _fedfm("simulate", "-c", str(config), "-o", str(directory / "output"))
            runs[secure, rounds] = config, directory / "output"
        return runs[secure, rounds]

    return run


# Killed in the last round, so every earlier one is checkpointed: two rounds, so that the resumed round continues
# from a restored server state (FedAdam's moments); one for the pipeline under secure aggregation, whose ~20 tasks a
# round are each a kfp.local subprocess (the other three cases check the server state carried across a resume).
@pytest.mark.parametrize("command, secure, rounds", [("simulate", False, 2), ("run", False, 2), ("simulate", True, 2),
                                                     ("run", True, 1)],
                         ids=["simulate", "run", "simulate-secure-aggregation", "run-secure-aggregation"])
def test_kill_9_mid_round_then_resume_gives_the_uninterrupted_result(uninterrupted, tmp_path, command, secure,
                                                                     rounds):
    """Under secure aggregation the resumed round runs the protocol afresh (new keys, new masks), and its
    masked sum still unmasks to the same mean update."""
    config, reference_run = uninterrupted(secure, rounds)

    run = tmp_path / "interrupted"
    _killed_mid_round(command, config, run, round_index=rounds)  # the last round: every earlier one is done
    checkpoints = run / "checkpoints"
    finished = _snapshot(checkpoints)
    assert sorted(path.name for path in checkpoints.iterdir()) == [f"round-{r:04d}" for r in range(rounds)]
    events_before = (run / "events.jsonl").stat().st_size
    status = " ".join(_fedfm("status", str(run)).stdout.split())
    finished_rounds = "round 0 finished" if rounds == 1 else f"rounds 0-{rounds - 1} finished"
    assert status.endswith(f"not finished: {finished_rounds}; if it is no longer running, "
                           f"`fedfm {command} --resume {run}` goes on from round {rounds}")

    resumed_output = " ".join(_fedfm(command, "--resume", str(run)).stdout.split())
    assert f"resuming {run}: {finished_rounds} (checkpointed); it restarts from round {rounds}" in resumed_output

    _assert_same_adapter(run / "adapter", reference_run / "adapter")
    after = _snapshot(checkpoints)
    assert {name: value for name, value in after.items() if name in finished} == finished  # untouched
    resumed, _ = events.read(run / "events.jsonl", events_before)
    trained = {event.get("round") for event in resumed if event["step"] == "client_finetune"
               and event["event"] == "finished"}
    assert trained == {rounds}, "a checkpointed round was trained again"
    evaluated = {event.get("round") for event in resumed
                 if event["step"] == "evaluate" and event["event"] == "finished"}
    assert evaluated == {rounds}, "a checkpointed round was evaluated again"
    assert not any(event["step"] == "checkpoint" and event.get("round") != rounds for event in resumed)
    history = json.loads((run / "metrics.json").read_text())["rounds"]
    reference = json.loads((reference_run / "metrics.json").read_text())["rounds"]
    assert [record["round"] for record in history] == list(range(rounds + 1))
    assert all(("secure_aggregation" in record) == secure for record in history[1:])
    assert history[-1]["eval"]["global"]["loss"] == pytest.approx(reference[-1]["eval"]["global"]["loss"],
                                                                   rel=1e-5)
    # the killed round's partial work is set aside, not deleted
    if command == "simulate":
        assert list((run / "work").glob(f"round-{rounds}.interrupted-*"))
    if command == "run" and secure:
        _check_a_secure_pipeline_round(run, events.read(run / "events.jsonl")[0], round_index=1)
    with pytest.raises(subprocess.CalledProcessError):  # a finished run is not resumed again
        subprocess.run([FEDFM, command, "--resume", str(run)], capture_output=True, check=True, timeout=300)


def _check_a_secure_pipeline_round(run: Path, seen: list[dict], round_index: int) -> None:
    """kfp.local ran each client step of the round as its own task (advertise, share, fine-tune, confirm, reveal)
    and the server's relays between them; the server's tasks held masked updates only, and the plain updates stayed in
    each client's own state location."""
    from fedfm.adapters import load_adapter

    clients = ["tenant-0", "tenant-1", "tenant-2"]
    tasks = run / "kfp"
    written = [load_adapter(path) for path in tasks.rglob("new_global_adapter") if path.is_file()]
    # the round's aggregate, and the copies of it that the resumed run's steps for that round passed on
    aggregated = [adapter for adapter in written if adapter.meta.round == round_index]
    assert aggregated and all(adapter.meta.metrics["secure_aggregation"] == {
        "survivors": clients, "threshold": 2, "dropped": []} for adapter in aggregated)
    assert not list(tasks.rglob("client-finetune*"))  # the plain fine-tune step never ran
    # (the killed run's unfinished tasks left empty placeholders for their outputs)
    masked = [path for path in tasks.rglob("update") if path.is_file() and path.stat().st_size]
    assert masked and all(load_file(path).keys() == {"masked"} for path in masked)
    plain = sorted((run / "client-state").glob(f"*/secagg/round-{round_index:04d}/update.safetensors"))
    assert len(plain) == 3  # they stay in each client's own state location
    finished = {(e["step"], e.get("client")) for e in seen
                if e["event"] == "finished" and e.get("round") == round_index}
    for step in ("secagg_advertise", "secagg_share", "client_finetune", "secagg_confirm", "secagg_reveal"):
        assert {client for name, client in finished if name == step} == set(clients), step
    assert {("secagg_relay_keys", None), ("secagg_relay_shares", None), ("secagg_sum", None),
            ("secagg_relay_confirmations", None), ("aggregate", None), ("evaluate", None)} <= finished


def test_resume_refuses_new_config_flags_and_a_directory_that_is_not_a_run(tmp_path):
    (tmp_path / "not-a-run").mkdir()
    for args, message in ((["simulate", "--resume", str(tmp_path / "not-a-run")], "has no readable run.json"),
                          (["run", "--resume", str(tmp_path / "not-a-run"), "--rounds", "5"],
                           "keeps the config it started with; drop --rounds"),
                          (["simulate", "--attack", "sign-flop", "--output", str(tmp_path / "x")],
                           "accepted: sign-flip")):
        done = subprocess.run([FEDFM, *args], capture_output=True, text=True, timeout=300)
        said = " ".join((done.stdout + done.stderr).replace("│", " ").split())  # typer's error box wraps lines
        assert done.returncode == 2 and message in said, (args, said)
    assert not (tmp_path / "x").exists()  # refused before anything was made


def test_simulate_attack_sends_the_attackers_poisoned_updates(tiny_config, tmp_path):
    """``fedfm simulate --attack sign-flip:10``: the attacker's update is −10 × its honest one; FedAvg takes
    it; the robust preset leaves it out (a majority quorum, so the round goes on)."""
    from typer.testing import CliRunner

    from fedfm.adapters import load_adapter
    from fedfm.cli import app

    cfg = tiny_config(rounds=1, clients=4)
    for name, run_cfg in (("fedavg", cfg), ("robust", cfg.with_overrides({"policy.preset": "robust"}))):
        config = tmp_path / f"{name}.yaml"
        config.write_text(yaml.safe_dump(run_cfg.as_dict()))
        result = CliRunner().invoke(app, ["simulate", "-c", str(config), "--attack", "sign-flip:10",
                                          "--attackers", "1", "--output", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "fedavg" / "run.json").read_text())
    attacker = record["attack"]["clients"][0]
    assert record["attack"] == {"kind": "sign-flip", "scale": 10.0, "clients": [attacker]}
    updates = tmp_path / "fedavg" / "work" / "round-1" / "updates"
    sent = load_adapter(updates / f"{attacker}.safetensors").tensors
    honest = load_adapter(updates / f"{attacker}.safetensors.honest").tensors
    for name, value in honest.items():
        torch.testing.assert_close(sent[name], -10 * value)
    fedavg_round = json.loads((tmp_path / "fedavg" / "metrics.json").read_text())["rounds"][1]
    robust_round = json.loads((tmp_path / "robust" / "metrics.json").read_text())["rounds"][1]
    assert attacker in fedavg_round["clients"]
    assert attacker not in robust_round["clients"]
    assert robust_round["missing"][attacker].startswith(f"rejected: client {attacker}'s update norm")
