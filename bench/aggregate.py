"""What FedAvg's server step costs: throughput against the machine's bandwidth and Flower, and its memory.

    python bench/aggregate.py [--updates 32] [--repeats 5] [--memory-n 8,32,100] [--skip-flower] [--skip-memory]

Each update is a LoRA-shaped set of float32 tensors of about 50 MB: rank 16 on the q, k, v and o
projections of 24 layers of a 4096-wide model (192 tensors, 12,582,912 floats, 50.3 MB), with random
values drawn from a fixed seed and per-client sample counts drawn from the same seed.

1. Throughput over N = 32 updates held in memory, as bytes of updates read (N × 50.3 MB) per second of
   the aggregation call, median of ``--repeats`` timed calls after one warm-up (the best is printed too):
   - numpy streaming sum: ``np.add(acc, x, out=acc)`` over the same bytes (each update as one flat
     array), into an accumulator allocated in the timed call — the machine's bandwidth for this access
     pattern. An already-touched accumulator (pure loop) is printed for information;
   - FedFM's ``fedavg`` strategy (``build_strategy(StrategyConfig(name="fedavg")).aggregate``) on the
     same tensors (torch with its default threads; one thread is printed for information);
   - Flower's FedAvg (flwr, in its own venv, ``scripts/testenv/flwr-venv.sh``) on the same arrays,
     regenerated from the same seed in a subprocess of that interpreter and checked against ours:
     ``aggregate_inplace`` over ``FitRes`` results (its default path, ``FedAvg(inplace=True)``; the call
     includes deserialising each result's ``Parameters``, which is how Flower receives them) and plain
     ``aggregate`` over lists of arrays. The subprocess times numpy's sum too, as a cross-check.
   Targets: FedFM ≥ 0.7 × the numpy bandwidth; Flower's ``aggregate_inplace`` time ≥ 3 × ours.
   The share of the CPUs other processes used during the timings is printed: on a busy machine torch's
   intra-op threads stall (each of the 192 × N small adds waits for a descheduled thread), so FedFM's
   default-thread figure is only meaningful when that share is near 0.
2. Peak memory at N = 8, 32, 100, one fresh subprocess per N and strategy: each update is made inside
   the iterator handed to ``aggregate`` (as the aggregate step loads one file at a time), and the peak
   RSS during the call (VmHWM, reset through /proc/self/clear_refs just before, after malloc_trim hands
   cached free memory back) above the RSS just before it is reported in updates' worth (÷ 50.3 MB),
   twice: with glibc's default malloc (the process as deployed), and with a fixed mmap threshold so
   every tensor is its own mapping and RSS follows the bytes the code holds (glibc's heap otherwise
   keeps freed temporaries: FedAdam's default-malloc figure lands on ~5.3 or ~6.0 from run to run).
   ``fedadam`` (FedOpt) is measured in round 2, with its server state (m and v) from a round-1 call
   already present; that state is an input and its size is printed apart, as is the RSS the call's
   result keeps. Targets: flat in N for both; ≤ 3 updates' worth for FedAvg.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
MB, GB = 1e6, 1e9
RANK, HIDDEN, LAYERS, MODULES = 16, 4096, 24, ("q", "k", "v", "o")
SEED = 20240


def layout() -> list[tuple[str, tuple[int, int]]]:
    """The tensors of one update: PEFT-style names and shapes."""
    tensors = []
    for layer in range(LAYERS):
        for module in MODULES:
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}_proj"
            tensors.append((f"{prefix}.lora_A.weight", (RANK, HIDDEN)))
            tensors.append((f"{prefix}.lora_B.weight", (HIDDEN, RANK)))
    return tensors


FLOATS = sum(rows * cols for _, (rows, cols) in layout())
UPDATE_BYTES = FLOATS * 4


def sample_counts(count: int, seed: int = SEED) -> list[int]:
    return [int(n) for n in np.random.default_rng(seed).integers(50, 5000, size=count)]


def make_flat(index: int, seed: int = SEED) -> np.ndarray:
    """Update ``index`` as one contiguous float32 array (the same in every interpreter with this numpy)."""
    flat = np.random.default_rng([seed, index]).standard_normal(FLOATS, dtype=np.float32)
    flat *= 1e-3
    return flat


def split(flat):
    """Views of a flat buffer (numpy array or torch tensor) as the layout's named tensors."""
    views, offset = {}, 0
    for name, (rows, cols) in layout():
        views[name] = flat[offset:offset + rows * cols].reshape(rows, cols)
        offset += rows * cols
    return views


def numpy_sum(flats: list[np.ndarray], acc: np.ndarray | None = None) -> np.ndarray:
    """The baseline: a streaming float32 sum, into a fresh accumulator unless one is given."""
    if acc is None:
        acc = np.zeros(FLOATS, dtype=np.float32)
    for flat in flats:
        np.add(acc, flat, out=acc)
    return acc


def _cpu_ticks() -> tuple[int, int]:
    """All CPUs' busy and total time so far, in clock ticks (/proc/stat)."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return sum(fields) - fields[3] - fields[4], sum(fields)  # less idle and iowait


def _own_ticks() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return (usage.ru_utime + usage.ru_stime) * os.sysconf("SC_CLK_TCK")


def timed(functions: dict[str, object], repeats: int) -> tuple[dict[str, list[float]], float]:
    """Seconds per call of each function, one warm-up each, then ``repeats`` rounds alternating between
    them (so a drift in machine load hits every variant alike); and the share of all CPUs that other
    processes used meanwhile."""
    for function in functions.values():
        function()
    seconds: dict[str, list[float]] = {name: [] for name in functions}
    busy, total, own = *_cpu_ticks(), _own_ticks()
    for _ in range(repeats):
        for name, function in functions.items():
            started = time.perf_counter()
            function()
            seconds[name].append(time.perf_counter() - started)
    busy_after, total_after = _cpu_ticks()
    others = max(0.0, (busy_after - busy - (_own_ticks() - own)) / max(1, total_after - total))
    return seconds, others


# --- 1. throughput -------------------------------------------------------------------------------


def throughput(count: int, repeats: int, skip_flower: bool) -> None:
    import torch

    from fedfm.adapters import Adapter, AdapterMeta
    from fedfm.config import StrategyConfig
    from fedfm.strategies import build_strategy

    samples = sample_counts(count)
    flats = [make_flat(i) for i in range(count)]
    updates = [Adapter({name: torch.from_numpy(view) for name, view in split(flat).items()},
                       AdapterMeta(kind="update", base_model="m", peft_config={}, round=1, samples=samples[i],
                                   client=f"c{i}"))
               for i, flat in enumerate(flats)]
    global_tensors = {name: torch.zeros(shape) for name, shape in layout()}
    strategy = build_strategy(StrategyConfig(name="fedavg"))
    threads = torch.get_num_threads()
    warm = np.zeros(FLOATS, dtype=np.float32)
    result: dict = {}

    def ours() -> None:
        result["tensors"] = strategy.aggregate(global_tensors, iter(updates), {}).tensors

    def ours_one_thread() -> None:
        torch.set_num_threads(1)
        try:
            strategy.aggregate(global_tensors, iter(updates), {})
        finally:
            torch.set_num_threads(threads)

    seconds, others = timed({"numpy": lambda: numpy_sum(flats), "numpy_warm": lambda: numpy_sum(flats, warm),
                              "ours": ours, "ours_1": ours_one_thread}, repeats)
    ours_mean = torch.cat([result["tensors"][name].reshape(-1) for name, _ in layout()]).numpy()
    reference = np.zeros(FLOATS, dtype=np.float64)  # float64 weighted mean, to check ours
    for weight, flat in zip(samples, flats):
        reference += weight * flat.astype(np.float64)
    reference /= sum(samples)
    our_error = float(np.abs(ours_mean - reference).max())
    updates.clear(), flats.clear(), result.clear()  # free 1.6 GB before Flower's subprocess

    flower = None if skip_flower else flower_times(count, repeats, samples, ours_mean)
    volume = count * UPDATE_BYTES
    print(f"\n1. throughput: FedAvg over N = {count} updates of {UPDATE_BYTES / MB:.1f} MB "
          f"({len(layout())} tensors each, {volume / GB:.2f} GB read per call); median (best) of {repeats} calls")
    rows = [("numpy streaming sum, fresh acc (baseline)", seconds["numpy"]),
            ("numpy streaming sum, touched acc (info)", seconds["numpy_warm"]),
            (f"FedFM fedavg ({threads} torch threads)", seconds["ours"]),
            ("FedFM fedavg (1 torch thread, info)", seconds["ours_1"])]
    if flower:
        rows += [("numpy streaming sum, in the Flower venv", flower["numpy"]),
                 ("Flower aggregate_inplace (FedAvg default)", flower["inplace"]),
                 ("Flower aggregate", flower["aggregate"])]
    shares = (f"{others:.0%} of the {os.cpu_count()} CPUs during our timings"
              + (f", {flower['others']:.0%} during Flower's" if flower else ""))
    noisy = max(others, flower["others"] if flower else 0) > 0.05
    print(f"   other processes used {shares}"
          + (" — the timings are disturbed (torch's threads stall when a core is taken)" if noisy else ""))
    print(f"   {'variant':44s} {'ms/call':>9s} {'GB/s':>7s} {'best GB/s':>10s}")
    for name, values in rows:
        median = statistics.median(values)
        print(f"   {name:44s} {median * 1000:9.1f} {volume / median / GB:7.2f} {volume / min(values) / GB:10.2f}")
    ours_s, numpy_s = statistics.median(seconds["ours"]), statistics.median(seconds["numpy"])
    print(f"   FedFM's result vs a float64 weighted mean: max |error| {our_error:.2e} (values ~1e-3)")
    ratio = numpy_s / ours_s
    print(f"   FedFM fedavg / numpy bandwidth: {ratio:.2f}× (target >= 0.7: {'met' if ratio >= 0.7 else 'NOT met'}); "
          f"vs the touched-accumulator loop: {statistics.median(seconds['numpy_warm']) / ours_s:.2f}×")
    if flower:
        print(f"   Flower's result vs FedFM's: max |difference| {flower['difference']:.2e}")
        for key, label in (("inplace", "aggregate_inplace"), ("aggregate", "aggregate")):
            speedup = statistics.median(flower[key]) / ours_s
            target = f" (target >= 3: {'met' if speedup >= 3 else 'NOT met'})" if key == "inplace" else " (info)"
            print(f"   Flower {label} time / FedFM's: {speedup:.2f}×{target}")
    one = statistics.median(seconds["ours_1"])
    print(f"   (info) FedFM fedavg at 1 torch thread: {numpy_s / one:.2f}× numpy"
          + (f", Flower aggregate_inplace / it {statistics.median(flower['inplace']) / one:.2f}×" if flower else ""))


def flower_times(count: int, repeats: int, samples: list[int], ours_mean: np.ndarray) -> dict | None:
    """Flower's timings from a subprocess of the Flower venv's python, on the same regenerated inputs."""
    try:
        python = subprocess.run([str(REPO / "scripts/testenv/flwr-venv.sh")], check=True, capture_output=True,
                                text=True).stdout.strip().splitlines()[-1]
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"   (Flower venv unavailable, its rows are left out: {exc})")
        return None
    with tempfile.TemporaryDirectory(prefix="fedfm-bench-aggregate-") as scratch:
        spec = {"count": count, "repeats": repeats, "samples": samples, "out": scratch}
        subprocess.run([python, __file__, "--flower-child", json.dumps(spec)], check=True)
        figures = json.loads((Path(scratch) / "times.json").read_text())
        theirs = np.load(Path(scratch) / "mean.npy")
    figures["difference"] = float(np.abs(theirs - ours_mean).max())
    return figures


def flower_child(spec: dict) -> None:
    """Run by the Flower venv's python: time Flower's aggregation on the regenerated updates."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.server.strategy.aggregate import aggregate, aggregate_inplace

    count, samples = spec["count"], spec["samples"]
    flats = [make_flat(i) for i in range(count)]
    arrays = [list(split(flat).values()) for flat in flats]
    fit_results = [(None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(layers), samples[i], {}))
                   for i, layers in enumerate(arrays)]
    weighted = [(layers, samples[i]) for i, layers in enumerate(arrays)]
    outcome: dict = {}
    seconds, others = timed({"numpy": lambda: numpy_sum(flats),
                     "inplace": lambda: outcome.__setitem__("mean", aggregate_inplace(fit_results)),
                     "aggregate": lambda: aggregate(weighted)}, spec["repeats"])
    np.save(Path(spec["out"]) / "mean.npy", np.concatenate([layer.reshape(-1) for layer in outcome["mean"]]))
    (Path(spec["out"]) / "times.json").write_text(json.dumps(seconds | {"others": others}))


# --- 2. peak memory ------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def memory_child(count: int, rule: str) -> None:
    """Run in a fresh process: the peak RSS growth of one ``rule`` aggregation of ``count`` updates."""
    import ctypes
    import gc

    import torch

    from fedfm.adapters import Adapter, AdapterMeta
    from fedfm.config import StrategyConfig
    from fedfm.strategies import build_strategy

    strategy = build_strategy(StrategyConfig(name=rule))

    def stream(n: int, round_index: int):
        for i in range(n):  # made when asked for, so only the updates the rule still holds are alive
            update = Adapter(split(torch.full((FLOATS,), 1e-3 * (i % 7 - 3))),
                             AdapterMeta(kind="update", base_model="m", peft_config={}, round=round_index,
                                         samples=100 + i, client=f"c{i}"))
            yield update
            del update  # as the aggregate step's loader does: not held while the next one is made

    # round 1 (small): warms torch up, and gives FedOpt the server state it carries into round 2
    first = strategy.aggregate({name: torch.zeros(shape) for name, shape in layout()}, stream(2, 1), {})
    global_tensors, state = first.tensors, first.state
    del first
    gc.collect()
    state_bytes = sum(value.numel() * value.element_size() for value in state.values()
                      if isinstance(value, torch.Tensor))
    # hand the allocator's cached free memory back to the OS first: memory freed in round 1 and reused
    # by this call would otherwise hide part of what the call needs
    trim = ctypes.CDLL(None).malloc_trim
    trim(0)
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS now
    reset = _status_kib("VmHWM")
    result = strategy.aggregate(global_tensors, stream(count, 2), state)
    peak = _status_kib("VmHWM")
    trim(0)
    after = _status_kib("VmRSS")
    if len(result.clients) != count:
        raise SystemExit(f"{rule} counted {len(result.clients)} of {count} updates")
    print(json.dumps({"before_kib": before, "reset_kib": reset, "peak_kib": peak, "after_kib": after,
                      "state_bytes": state_bytes}))


def _memory_run(count: int, rule: str, live: bool) -> dict:
    env = dict(os.environ)
    if live:  # a fixed mmap threshold: every tensor its own mapping, unmapped when freed
        env["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
    else:
        env.pop("MALLOC_MMAP_THRESHOLD_", None)
    line = subprocess.run([sys.executable, __file__, "--memory-child", str(count), rule], check=True, env=env,
                          capture_output=True, text=True).stdout.strip().splitlines()[-1]
    figures = json.loads(line)
    if abs(figures["reset_kib"] - figures["before_kib"]) > 1024:
        print(f"   (warning: the VmHWM reset left {figures['reset_kib']} kB against VmRSS {figures['before_kib']} kB)")
    return {key: (figures[f"{key}_kib"] - figures["before_kib"]) * 1024 / UPDATE_BYTES for key in ("peak", "after")
            } | {"state": figures["state_bytes"] / UPDATE_BYTES}


def memory(counts: list[int]) -> None:
    rules = ("fedavg", "fedadam")
    print(f"\n2. peak RSS growth during aggregate above the RSS before it, in updates' worth (1 = "
          f"{UPDATE_BYTES / MB:.1f} MB); a fresh process per rule and N; each update made inside the iterator")
    print("   'glibc default': the process as deployed; 'live': MALLOC_MMAP_THRESHOLD_=65536, so each tensor is")
    print("   its own mapping and RSS follows the bytes the code holds (+1.6% page rounding on 256 KiB tensors)")
    print(f"   {'rule':8s} {'N':>4s} {'peak, glibc default':>20s} {'peak, live':>11s} {'kept after (result)':>20s} "
          f"{'state (input)':>14s}")
    peaks: dict[tuple[str, bool], dict[int, float]] = {(rule, live): {} for rule in rules for live in (False, True)}
    for rule in rules:
        for count in counts:
            default, live = _memory_run(count, rule, False), _memory_run(count, rule, True)
            peaks[rule, False][count], peaks[rule, True][count] = default["peak"], live["peak"]
            print(f"   {rule:8s} {count:4d} {default['peak']:20.3f} {live['peak']:11.3f} {live['after']:20.3f} "
                  f"{live['state']:14.2f}")
    for rule in rules:
        for live in (False, True):
            values = peaks[rule, live]
            low, high = min(values.values()), max(values.values())
            verdict = f"flat in N (spread ≤ 0.25): {'met' if high - low <= 0.25 else 'NOT met'}"
            if rule == "fedavg":
                over = (high - 3) * UPDATE_BYTES / MB
                verdict += ("; ≤ 3 updates' worth: met" if high <= 3 else
                            f"; ≤ 3 updates' worth: NOT met (by {over:.1f} MB)")
            print(f"   {rule} ({'live' if live else 'glibc default'}): {low:.3f}–{high:.3f} over N = "
                  f"{', '.join(map(str, counts))}; {verdict}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--updates", type=int, default=32, help="N for the throughput part")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per variant (after one warm-up)")
    parser.add_argument("--memory-n", default="8,32,100", help="comma-separated N for the memory part")
    parser.add_argument("--skip-flower", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--flower-child", metavar="SPEC", help=argparse.SUPPRESS)
    parser.add_argument("--memory-child", nargs=2, metavar=("N", "RULE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    if args.flower_child:
        flower_child(json.loads(args.flower_child))
        return 0
    if args.memory_child:
        memory_child(int(args.memory_child[0]), args.memory_child[1])
        return 0
    if not args.skip_throughput:
        throughput(args.updates, args.repeats, args.skip_flower)
    if not args.skip_memory:
        memory([int(n) for n in args.memory_n.split(",")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
