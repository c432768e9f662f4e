"""Checkpoints of the federation's state: complete or absent, verified, never replaced, and a resume that
neither recomputes nor skips a round."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from fedfm import checkpoint
from fedfm.adapters import AdapterMeta, save_adapter
from fedfm.config import FederationConfig
from fedfm.errors import CheckpointError


def _round_files(directory: Path, round_index: int, size: int = 64) -> tuple[str, str, str]:
    """A round's adapter, server state and history, as the round leaves them."""
    directory.mkdir(parents=True, exist_ok=True)
    adapter = directory / f"global-{round_index}.safetensors"
    tensors = {"base_model.model.layer.lora_A.weight": torch.full((4, size), float(round_index))}
    save_adapter(adapter, tensors, AdapterMeta(kind="global", base_model="f" * 64, peft_config={"r": 4},
                                               round=round_index))
    state = directory / f"state-{round_index}"
    state.write_bytes(b"" if round_index == 0 else f"state {round_index}".encode())
    history = directory / f"history-{round_index}.json"
    history.write_text(json.dumps([{"round": r} for r in range(round_index + 1)]))
    return str(adapter), str(state), str(history)


def test_a_checkpoint_holds_the_rounds_files_verified(tmp_path):
    cfg, root = FederationConfig(seed=7), str(tmp_path / "checkpoints")
    for round_index in range(3):
        checkpoint.save(root, cfg, round_index, *_round_files(tmp_path / "run", round_index))
    last = checkpoint.latest(root)
    assert last.round == 2 and checkpoint.latest_round(root) == 2
    assert Path(last.uri("global_adapter")).read_bytes() == (tmp_path / "run" / "global-2.safetensors").read_bytes()
    assert Path(last.uri("server_state")).read_bytes() == b"state 2"
    assert json.loads(Path(last.uri("history")).read_text())[-1] == {"round": 2}
    assert last.manifest["sampler"] == {"seed": 7, "next_round": 3}
    assert last.config == cfg


def test_a_checkpointed_round_is_never_replaced(tmp_path):
    cfg, root = FederationConfig(), str(tmp_path / "checkpoints")
    checkpoint.save(root, cfg, 0, *_round_files(tmp_path / "run", 0))
    before = {path: path.read_bytes() for path in Path(root).rglob("*") if path.is_file()}
    with pytest.raises(CheckpointError, match="round 0 is already checkpointed"):
        checkpoint.save(root, cfg, 0, *_round_files(tmp_path / "other", 0, size=8))
    assert {path: path.read_bytes() for path in Path(root).rglob("*") if path.is_file()} == before


def test_a_damaged_checkpoint_is_refused_by_name(tmp_path):
    cfg, root = FederationConfig(), str(tmp_path / "checkpoints")
    saved = checkpoint.save(root, cfg, 0, *_round_files(tmp_path / "run", 0))
    adapter = Path(saved.uri("global_adapter"))
    data = adapter.read_bytes()
    adapter.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    with pytest.raises(CheckpointError, match="global_adapter.safetensors does not match the sha256"):
        checkpoint.latest(root)
    Path(saved.directory, "checkpoint.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="checkpoint.json is damaged"):
        checkpoint.load(root, 0)


def test_a_start_round_must_follow_the_last_checkpoint(tmp_path):
    cfg, root = FederationConfig(), str(tmp_path / "checkpoints")
    assert checkpoint.require_start(None, 1) is None and checkpoint.require_start(root, 1) is None
    with pytest.raises(CheckpointError, match="set execution.checkpoint_uri"):
        checkpoint.require_start(None, 2)
    with pytest.raises(CheckpointError, match="needs round 2's checkpoint"):
        checkpoint.require_start(root, 3)
    for round_index in range(3):
        checkpoint.save(root, cfg, round_index, *_round_files(tmp_path / "run", round_index))
    assert checkpoint.require_start(root, 3).round == 2
    for wrong in (1, 2, 4):  # recomputing a checkpointed round, or skipping one
        with pytest.raises(CheckpointError, match="resume with start_round 3"):
            checkpoint.require_start(root, wrong)


# --- killed while writing --------------------------------------------------------------------------

_KILLED_AT_FSYNC = textwrap.dedent("""
    import os, signal, sys
    from fedfm import checkpoint
    from fedfm.config import FederationConfig

    root, kill_at, files = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    calls = [0]
    real_fsync = os.fsync

    def fsync(fd):
        calls[0] += 1
        if calls[0] == kill_at:  # kill -9 of ourselves, in the middle of the checkpoint's writes
            os.kill(os.getpid(), signal.SIGKILL)
        real_fsync(fd)

    os.fsync = fsync
    checkpoint.save(root, FederationConfig(), 1, *files)
""")

# each file: fsync of its data (before it is linked in), fsync of the directory (after); the manifest last
_FSYNCS_PER_CHECKPOINT = 2 * (len(checkpoint.FILES) + 1)


def _assert_whole_or_absent(directory: Path, sources: dict[str, bytes]) -> None:
    """Every file under its final name is whole: no half-written checkpoint file, whatever was killed."""
    for role, data in sources.items():
        target = directory / checkpoint.FILES[role]
        assert not target.exists() or target.read_bytes() == data, target


@pytest.mark.parametrize("kill_at", range(1, _FSYNCS_PER_CHECKPOINT + 1))
def test_a_kill_during_the_write_leaves_the_checkpoint_whole_or_absent(tmp_path, kill_at):
    cfg, root = FederationConfig(), tmp_path / "checkpoints"
    checkpoint.save(str(root), cfg, 0, *_round_files(tmp_path / "run", 0))
    files = _round_files(tmp_path / "run", 1, size=4096)
    sources = {role: Path(path).read_bytes() for role, path in zip(("global_adapter", "server_state", "history"),
                                                                   files)}
    done = subprocess.run([sys.executable, "-c", _KILLED_AT_FSYNC, str(root), str(kill_at), *files])
    assert done.returncode == -signal.SIGKILL
    directory = Path(checkpoint.round_directory(str(root), 1))
    _assert_whole_or_absent(directory, sources)
    manifest_written = kill_at == _FSYNCS_PER_CHECKPOINT  # killed after the manifest was linked in
    assert checkpoint.latest_round(str(root)) == (1 if manifest_written else 0)
    assert checkpoint.latest(str(root)).round in (0, 1)  # verified: every file matches its recorded sha256
    if not manifest_written:  # the round is not checkpointed; run again, it is, over the leftovers
        checkpoint.save(str(root), cfg, 1, *files)
        assert checkpoint.latest(str(root)).round == 1


_WRITING_FOREVER = textwrap.dedent("""
    import sys
    from fedfm import checkpoint
    from fedfm.config import FederationConfig

    root, files = sys.argv[1], sys.argv[2:]
    print("ready", flush=True)
    for round_index in range(1, 1000):
        checkpoint.save(root, FederationConfig(), round_index, *files)
""")


def test_a_kill_at_a_random_moment_never_leaves_a_half_written_file(tmp_path):
    """kill -9 while big checkpoints are being written, at moments nobody chose: every round is either
    checkpointed and verified or has no manifest, and its files are whole or absent."""
    files = _round_files(tmp_path / "run", 1, size=1_000_000)  # a 16 MB adapter: writes take a while
    sources = {role: Path(path).read_bytes() for role, path in zip(("global_adapter", "server_state", "history"),
                                                                   files)}
    for attempt, delay in enumerate((0.15, 0.4, 0.75)):
        root = tmp_path / f"checkpoints-{attempt}"
        writer = subprocess.Popen([sys.executable, "-c", _WRITING_FOREVER, str(root), *files], stdout=subprocess.PIPE)
        assert writer.stdout.readline() == b"ready\n"
        time.sleep(delay)
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait()
        rounds = sorted(Path(root).glob("round-*")) if root.exists() else []
        last = checkpoint.latest_round(str(root))
        if last is not None:
            assert checkpoint.latest(str(root)).round == last
        for directory in rounds:
            _assert_whole_or_absent(directory, sources)


def test_the_federation_status_says_where_to_resume(monkeypatch, tmp_path):
    """Cluster mode: each checkpoint goes to the Federation's status.lastCheckpoint (in the CRD's schema),
    and a failed round's condition says which start_round and checkpoint_uri resume the run."""
    from fedfm.operators import executor as cluster
    from fedfm.operators.crds import federation_crd
    from fedfm.operators.handlers import _failed_message

    cfg = FederationConfig.parse({"name": "fed", "data": {"labels": ["a", "b"]},
                                  "execution": {"mode": "kubernetes", "storage_uri": "s3://bucket/fedfm",
                                                "federation_namespace": "platform"}})
    root = checkpoint.checkpoint_root(cfg, "run-1")
    assert root == f"s3://bucket/fedfm/fed/runs/{checkpoint.run_key('run-1')}/checkpoints"
    reports = []
    executor = cluster.KubernetesExecutor(cfg, "run-1")
    monkeypatch.setattr(executor, "_report", reports.append)
    executor.round_checkpointed(cfg, 4, checkpoint.round_directory(root, 4))
    saved = reports[0]["lastCheckpoint"]
    assert {key: saved[key] for key in ("round", "uri", "runId")} == {"round": 4, "uri": root, "runId": "run-1"}
    schema = federation_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert set(schema["properties"]["status"]["properties"]["lastCheckpoint"]["properties"]) == set(saved)

    failure = {"round": 5, "runId": "run-1", "message": "round 5: 2 of 4 clients sent an update"}
    assert _failed_message(failure, saved) == (f"round 5: 2 of 4 clients sent an update; resume after round 4: "
                                               f"start_round 5 with execution.checkpoint_uri {root}")
    assert _failed_message({**failure, "runId": "run-2"}, saved) == failure["message"]  # another run's checkpoint
