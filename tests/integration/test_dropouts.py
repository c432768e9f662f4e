"""Clients that die, straggle or keep failing: the quorum decides, retries draw fresh clients, repeat
offenders are quarantined, and a run that fails below the quorum resumes from its last checkpoint."""

from __future__ import annotations

import json

import pytest

from fedfm import training
from fedfm.errors import QuorumError

pytestmark = pytest.mark.slow


def _dying(monkeypatch, dead: dict[int, set[str]]) -> list[tuple[str, int]]:
    """Make the clients in ``dead[round]`` die in the middle of their fine-tune (after loading the global
    adapter, before writing an update); returns every (client, round) that started training."""
    started, real = [], training.train_client

    def train_client(cfg, client, round_index, global_adapter, update_out, **options):
        started.append((client, round_index))
        if client in dead.get(round_index, set()):
            def die(frame):
                raise RuntimeError(f"{client}'s process was killed mid-round")
            return real(cfg, client, round_index, global_adapter, update_out, poison_data=die)
        return real(cfg, client, round_index, global_adapter, update_out, **options)

    monkeypatch.setattr(training, "train_client", train_client)
    return started


def _history(run) -> list[dict]:
    return json.loads((run / "metrics.json").read_text())["rounds"]


def test_two_dead_of_eight_with_quorum_six_the_round_completes_on_six(tiny_config, tmp_path, monkeypatch):
    from fedfm.simulation import simulate

    cfg = tiny_config(clients=8, rounds=1, **{"policy.min_clients": 6})
    _dying(monkeypatch, {1: {"tenant-2", "tenant-5"}})
    run = simulate(cfg, tmp_path / "run")
    last = run.history[-1]
    assert sorted(last["clients"]) == sorted(set(cfg.client_names) - {"tenant-2", "tenant-5"})
    assert set(last["missing"]) == {"tenant-2", "tenant-5"}
    assert "killed mid-round" in last["missing"]["tenant-2"] and last["missing"]["tenant-2"].startswith("Failed")
    assert (run.adapter_dir / "adapter_model.safetensors").exists()


def test_three_dead_fail_the_round_saying_so_and_the_run_resumes_after(tiny_config, tmp_path, monkeypatch):
    from fedfm.simulation import simulate

    cfg = tiny_config(clients=8, rounds=2, **{"policy.min_clients": 6})
    started = _dying(monkeypatch, {2: {"tenant-1", "tenant-4", "tenant-6"}})
    with pytest.raises(QuorumError) as failure:
        simulate(cfg, tmp_path / "run")
    message = str(failure.value)
    assert "round 2: 5 of 8 clients sent an update, below the quorum of 6 (policy.min_clients)" in message
    for client in ("tenant-1", "tenant-4", "tenant-6"):
        assert f"{client}: Failed: RuntimeError: {client}'s process was killed mid-round" in message
    assert not (tmp_path / "run" / "work" / "round-2" / "global_adapter.safetensors").exists()

    monkeypatch.undo()  # the clients are back
    started = _dying(monkeypatch, {})
    run = simulate(None, tmp_path / "run", resume=True)
    assert {round_index for _, round_index in started} == {2}, "round 1 was checkpointed: it is not trained again"
    assert [record["round"] for record in run.history] == [0, 1, 2]
    assert sorted(run.history[-1]["clients"]) == cfg.client_names
    assert list((tmp_path / "run" / "work").glob("round-2.interrupted-*"))  # the failed attempt, kept aside


def test_below_quorum_retry_draws_fresh_clients_for_the_dead(tiny_config, tmp_path, monkeypatch):
    from fedfm.simulation import simulate

    cfg = tiny_config(clients=8, rounds=1, **{"policy.min_clients": 6, "policy.sample_fraction": 0.75,
                                              "policy.below_quorum": "retry"})
    drawn = cfg.sampled_clients(1)
    assert len(drawn) == 6
    dead = set(drawn[:2])
    started = _dying(monkeypatch, {1: dead})
    run = simulate(cfg, tmp_path / "run")
    last = run.history[-1]
    assert set(last["missing"]) == dead
    assert len(last["clients"]) == 6  # the 4 survivors and the 2 clients not drawn at first
    assert {client for client, _ in started} == set(cfg.client_names)
    assert started[:6] == [(client, 1) for client in drawn]


def test_without_retry_the_same_round_fails(tiny_config, tmp_path, monkeypatch):
    from fedfm.simulation import simulate

    cfg = tiny_config(clients=8, rounds=1, **{"policy.min_clients": 6, "policy.sample_fraction": 0.75})
    _dying(monkeypatch, {1: set(cfg.sampled_clients(1)[:2])})
    with pytest.raises(QuorumError, match="4 of 6 clients sent an update, below the quorum of 6"):
        simulate(cfg, tmp_path / "run")


def test_a_client_that_keeps_failing_is_quarantined_and_not_drawn_again(tiny_config, tmp_path, monkeypatch):
    from fedfm.simulation import simulate

    cfg = tiny_config(clients=4, rounds=3, **{"policy.min_clients": 3, "policy.quarantine_after_failures": 2})
    started = _dying(monkeypatch, {1: {"tenant-3"}, 2: {"tenant-3"}, 3: {"tenant-3"}})
    run = simulate(cfg, tmp_path / "run")
    assert ("tenant-3", 3) not in started and ("tenant-3", 2) in started
    assert "sent no usable update in 2 rounds in a row" in run.history[2]["quarantined"]["tenant-3"]
    assert sorted(run.history[3]["clients"]) == ["tenant-0", "tenant-1", "tenant-2"]
    assert run.history[3]["missing"] == {}


def test_a_fine_tune_past_the_round_deadline_is_not_used(tiny_config, tmp_path, monkeypatch):
    """A straggler: its fine-tune ends after policy.round_deadline_seconds (the clock is advanced while it
    trains, so the test does not wait), and the round aggregates without it."""
    from fedfm import executors
    from fedfm.simulation import simulate

    class Clock:
        offset = 0.0

        def time(self):
            import time
            return time.time() + self.offset

    clock, real = Clock(), training.train_client

    def train_client(cfg, client, round_index, global_adapter, update_out, **options):
        result = real(cfg, client, round_index, global_adapter, update_out, **options)
        if client == "tenant-1":
            clock.offset += 3600  # an hour late
        return result

    monkeypatch.setattr(training, "train_client", train_client)
    monkeypatch.setattr(executors, "time", clock)
    cfg = tiny_config(clients=3, rounds=1, **{"policy.min_clients": 2, "policy.round_deadline_seconds": 600})
    run = simulate(cfg, tmp_path / "run")
    assert sorted(run.history[-1]["clients"]) == ["tenant-0", "tenant-2"]
    assert "past the round's deadline of 600 s" in run.history[-1]["missing"]["tenant-1"]
    assert run.history[-1]["missing"]["tenant-1"].startswith("TimedOut")


def test_a_fine_tune_that_hangs_is_stopped_at_the_round_deadline(tiny_config, tmp_path, monkeypatch):
    """A client that would never finish (it waits an hour mid-training) is stopped at
    policy.round_deadline_seconds, counts as TimedOut, and the round aggregates without it."""
    import time

    from fedfm.simulation import simulate

    woke, real = [], training.train_client

    def train_client(cfg, client, round_index, global_adapter, update_out, **options):
        if client != "tenant-1":
            return real(cfg, client, round_index, global_adapter, update_out, **options)

        def hang(frame):
            time.sleep(3600)
            woke.append(client)  # only if the deadline did not stop it
            return frame
        return real(cfg, client, round_index, global_adapter, update_out, poison_data=hang)

    monkeypatch.setattr(training, "train_client", train_client)
    cfg = tiny_config(clients=3, rounds=1, **{"policy.min_clients": 2, "policy.round_deadline_seconds": 20})
    run = simulate(cfg, tmp_path / "run")
    assert woke == []
    assert sorted(run.history[-1]["clients"]) == ["tenant-0", "tenant-2"]
    assert run.history[-1]["missing"]["tenant-1"] == (
        "TimedOut: the fine-tune was stopped at the round's deadline of 20 s (policy.round_deadline_seconds)")


def test_the_pipeline_retries_below_the_quorum_with_a_fresh_client(tiny_config, tmp_path):
    """``fedfm run`` (kfp.local): a drawn client that cannot keep its state (its state_uri is under a
    file, so the error-feedback residual of its int8 update cannot be written) fails its fine-tune step;
    the round is below its quorum, so the aggregate step draws a fresh client, which fine-tunes through
    the executor, and the round completes with the quorum."""
    from fedfm.pipelines.local_runner import run_local

    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    names = [f"tenant-{index}" for index in range(4)]
    overrides = {"policy.sample_fraction": 0.75, "policy.min_clients": 3, "policy.below_quorum": "retry",
                 "compression.method": "int8", "execution.client_state_uri": str(tmp_path / "state")}
    cfg = None
    for seed in range(50):
        dead = names[seed % 4]
        clients = [{"name": name, **({"state_uri": str(blocker / "state")} if name == dead else {})}
                   for name in names]
        cfg = tiny_config(rounds=1, seed=seed, clients=clients, **overrides)
        if dead in cfg.sampled_clients(1):
            break
    drawn = cfg.sampled_clients(1)
    fresh = cfg.fresh_clients(1, 2, 1, exclude=drawn)
    assert len(drawn) == 3 and len(fresh) == 1 and dead in drawn

    seen = []
    run = run_local(cfg, tmp_path / "run", on_event=seen.append)
    last = run.history[-1]
    assert sorted(last["clients"]) == sorted({*drawn, *fresh} - {dead})
    assert list(last["missing"]) == [dead] and last["missing"][dead].startswith("Failed: StorageError")
    retries = [event for event in seen if event["event"] == "retry"]
    assert [(event["round"], event["clients"], event["short"]) for event in retries] == [(1, fresh, 1)]
