"""Updates larger than memory: aggregation reads an update tensor by tensor from a private copy of its file,
so its peak is about the accumulator plus one tensor; and what it reads is what it verified."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from fedfm.adapters import AdapterMeta, content_sha256, load_adapter, save_adapter
from fedfm.config import FederationConfig
from fedfm.federation import aggregate_round
from fedfm.trust import admission

FINGERPRINT = "sha256:" + "d" * 64
MIB = 1 << 20
TENSOR_VALUES = 16 * MIB  # 64 MiB of float32
NAMES = ("layer0.weight", "layer1.weight", "layer2.weight")  # an update of 192 MiB
SAMPLES = (3, 5, 11)


def synthetic(seed: int) -> dict[str, torch.Tensor]:
    """Three 64 MiB tensors with values that round differently in every slot (cheap to make: no RNG)."""
    return {name: torch.arange(TENSOR_VALUES, dtype=torch.float32).mul_(1e-7 * (seed + 1)).add_(seed - index)
            for index, name in enumerate(NAMES)}


def expected_fedavg_sha256(start: dict[str, torch.Tensor], updates: list[dict[str, torch.Tensor]]) -> str:
    """FedAvg's result, computed here from the tensors in memory, as the content sha256 of its tensors."""
    result = {}
    for name in NAMES:
        total = torch.zeros(TENSOR_VALUES, dtype=torch.float32)
        for samples, tensors in zip(SAMPLES, updates):
            total.add_(tensors[name], alpha=samples)
        result[name] = total.div_(sum(SAMPLES)).add_(start[name])
    return content_sha256(result)


CHILD = """
import resource, sys, torch
from pathlib import Path
from safetensors.torch import load, load_file
from fedfm.config import FederationConfig
from fedfm.federation import aggregate_round

def data_bytes():
    return next(int(line.split()[1]) << 10 for line in open("/proc/self/status") if line.startswith("VmData"))

global_path, out, headroom, *updates = sys.argv[1:]
cfg = FederationConfig(clients=3)
baseline = data_bytes()
resource.setrlimit(resource.RLIMIT_DATA, (baseline + int(headroom), baseline + int(headroom)))
meta = aggregate_round(cfg, 1, global_path, [(f"tenant-{i}", uri) for i, uri in enumerate(updates)], out)
print("sha256", meta.sha256, "baseline MiB", baseline >> 20, flush=True)
accumulator = torch.empty(3 * (16 << 20), dtype=torch.float32)  # what the aggregation holds beside an update
for name, whole_file_load in (("load_file", lambda: load_file(updates[0])),
                              ("read and load", lambda: load(Path(updates[0]).read_bytes()))):
    try:
        whole_file_load()
        print(name, "succeeded")
    except Exception as exc:  # MemoryError, or the reader's own error for a failed allocation
        print(name, "failed:", type(exc).__name__, str(exc)[:200])
"""


def test_fedavg_aggregates_updates_a_whole_file_load_could_not_hold_beside_its_accumulator(tmp_path):
    start = synthetic(0)
    global_path = tmp_path / "global.safetensors"
    save_adapter(global_path, start, AdapterMeta(kind="global", base_model=FINGERPRINT, peft_config={}, round=0))
    updates, paths = [], []
    for index, samples in enumerate(SAMPLES):
        updates.append(synthetic(index + 1))
        paths.append(str(tmp_path / f"tenant-{index}.safetensors"))
        save_adapter(paths[-1], updates[-1], AdapterMeta(kind="update", base_model=FINGERPRINT, peft_config={},
                                                         round=1, samples=samples, client=f"tenant-{index}"))
    expected = expected_fedavg_sha256(start, updates)
    del start, updates
    # RLIMIT_DATA, not RLIMIT_AS: it counts the memory a process writes (heap, anonymous mappings: what a pod's
    # memory limit is about), not the address space torch's libraries and threads reserve without using it.
    # Above the child's data after its imports: the accumulator (192 MiB), one update's tensor (64 MiB), the
    # copy's chunk and the allocator's slack (measured: 304 MiB in all); below the accumulator plus one whole
    # update (384 MiB).
    headroom = 352 * MIB
    result = subprocess.run([sys.executable, "-c", CHILD, str(global_path), str(tmp_path / "next.safetensors"),
                             str(headroom), *paths], capture_output=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    output = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    assert f"sha256 {expected}" in output  # the same result as computed here, without a memory limit
    # the limit really is below the accumulator and one whole update
    assert "read and load failed: MemoryError" in output and "load_file failed" in output, output
    assert load_adapter(tmp_path / "next.safetensors").meta.sha256 == expected


def small_round(tmp_path) -> tuple[str, list[tuple[str, str]], dict[str, torch.Tensor]]:
    """A 3-client round of small updates: the global adapter's path, the update files, and their FedAvg."""
    start = {"a.weight": torch.linspace(-1, 1, 12).reshape(3, 4), "b.bias": torch.ones(4)}
    global_path = tmp_path / "global.safetensors"
    save_adapter(global_path, start, AdapterMeta(kind="global", base_model=FINGERPRINT, peft_config={}, round=0))
    pairs, deltas = [], []
    for index, samples in enumerate(SAMPLES):
        deltas.append({name: torch.full_like(value, 0.1 * (index + 1)) for name, value in start.items()})
        path = str(tmp_path / f"tenant-{index}.safetensors")
        save_adapter(path, deltas[-1], AdapterMeta(kind="update", base_model=FINGERPRINT, peft_config={}, round=1,
                                                   samples=samples, client=f"tenant-{index}"))
        pairs.append((f"tenant-{index}", path))
    honest = {name: start[name] + sum(n * delta[name] for n, delta in zip(SAMPLES, deltas)) / sum(SAMPLES)
              for name in start}
    return str(global_path), pairs, honest


def test_an_update_rewritten_after_its_check_changes_nothing_the_aggregation_reads(tmp_path, monkeypatch):
    """The swap attack: once tenant-0's update passed its sha256 and validation, it rewrites the file in place (same
    size, header and recorded sha256; other tensor values) before the aggregation reads the tensors. The
    aggregation reads the private copy it verified, so the result is the honest FedAvg."""
    global_path, pairs, honest = small_round(tmp_path)
    checked = admission.valid_update
    poisoned = torch.full((4,), 1000.0).numpy().tobytes()

    def then_rewrite(cfg, round_index, current, client, uri):
        update = checked(cfg, round_index, current, client, uri)
        if client == "tenant-0":  # the last 16 bytes of its data: four values of one of its tensors
            with open(uri, "r+b") as handle:
                handle.seek(-len(poisoned), os.SEEK_END)
                handle.write(poisoned)
        return update

    monkeypatch.setattr(admission, "valid_update", then_rewrite)
    before = Path(pairs[0][1]).read_bytes()
    meta = aggregate_round(FederationConfig(clients=3), 1, global_path, pairs, str(tmp_path / "next.safetensors"))
    assert Path(pairs[0][1]).read_bytes() != before  # the rewrite happened
    result = load_adapter(tmp_path / "next.safetensors").tensors
    for name, value in honest.items():
        assert torch.allclose(result[name], value, rtol=0, atol=1e-6), name
    assert meta.metrics["counted"] == ["tenant-0", "tenant-1", "tenant-2"]


def test_an_update_replaced_or_truncated_after_its_check_changes_nothing_the_aggregation_reads(tmp_path,
                                                                                             monkeypatch):
    """Another file put in its place (rename), or the file cut short, after the check: neither reaches the
    aggregation, nor makes it fail."""
    global_path, pairs, honest = small_round(tmp_path)
    checked = admission.valid_update

    def then_replace(cfg, round_index, current, client, uri):
        update = checked(cfg, round_index, current, client, uri)
        if client == "tenant-0":
            other = tmp_path / "other.safetensors"
            save_adapter(other, {name: torch.full_like(value, 1000.0) for name, value in honest.items()},
                         AdapterMeta(kind="update", base_model=FINGERPRINT, peft_config={}, round=1, samples=3,
                                     client="tenant-0"))
            other.replace(uri)
        if client == "tenant-1":
            os.truncate(uri, 100)
        return update

    monkeypatch.setattr(admission, "valid_update", then_replace)
    aggregate_round(FederationConfig(clients=3), 1, global_path, pairs, str(tmp_path / "next.safetensors"))
    result = load_adapter(tmp_path / "next.safetensors").tensors
    for name, value in honest.items():
        assert torch.allclose(result[name], value, rtol=0, atol=1e-6), name


def test_a_loaded_update_is_read_tensor_by_tensor_from_a_file_no_one_else_can_reach(tmp_path, monkeypatch):
    _, pairs, _ = small_round(tmp_path)
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    update = load_adapter(pairs[0][1], streamed=True)
    assert not list((tmp_path / "tmp").iterdir())  # the copy has no name: no one can open it to change it
    assert update.tensors.shapes == {"a.weight": (3, 4), "b.bias": (4,)}  # from the header: nothing read
    os.unlink(pairs[0][1])  # the original goes away: the update still reads, from its copy
    assert torch.equal(update.tensors["b.bias"], torch.full((4,), 0.1))
    update.tensors["b.bias"].mul_(2)  # a tensor read is the reader's own: changing it changes nothing stored
    assert torch.equal(update.tensors["b.bias"], torch.full((4,), 0.1))
