"""What FedFM's machinery costs beyond the training itself.

    python bench/overhead.py [--steps 40] [--rounds 2] [--clients 2]

1. DeepSpeed vs plain PyTorch: the step time of the DeepSpeed engine FedFM trains with (ZeRO 0, fp32,
   torch AdamW, gradient clipping) against a plain PEFT/PyTorch loop doing the same work (forward,
   backward, clip, AdamW) on the same model (all-MiniLM-L6-v2 + LoRA) and the same batch, measured in
   alternating blocks in one process. Target: plain / DeepSpeed ≥ 0.95. ZeRO 2 and bf16 rows are
   printed for information.
2. kfp.local pipeline overhead: a small federation through the real local pipeline; per task, its wall
   time (from KFP's log) split into the training loop, the in-step setup (model, data, DeepSpeed
   init) and the rest (process start, imports, artifact I/O); per round, wall time beyond training.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="measured steps per variant (after warm-up)")
    parser.add_argument("--block", type=int, default=5, help="steps per alternating block")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--skip-pipeline", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    step_times(args.steps, args.block)
    if not args.skip_pipeline:
        pipeline_overhead(args.rounds, args.clients)
    return 0


# --- 1. DeepSpeed vs plain PyTorch -------------------------------------------------------------


def step_times(steps: int = 40, block: int = 5) -> None:
    import torch

    from fedfm.config import FederationConfig
    from fedfm.data import load_client_data, resolve_labels
    from fedfm.modeling import build_model
    from fedfm.tasks import collate, encode
    from fedfm.training import deepspeed_engine, single_process_group

    cfg = resolve_labels(FederationConfig.parse({"model": {"max_length": 64}, "data": {"partition": "iid"},
                                                 "training": {"batch_size": 16}}))
    frame = load_client_data(cfg, "tenant-0").train
    batch = collate(encode(frame.head(16), build_model(cfg).tokenizer, cfg), 0)
    print(f"\n1. step time, all-MiniLM-L6-v2 + LoRA r={cfg.lora.r}, batch {tuple(batch['input_ids'].shape)}, "
          f"{torch.get_num_threads()} threads")

    def plain_runner():
        model = build_model(cfg).model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=cfg.training.learning_rate)

        def step():
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, cfg.training.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step

    def deepspeed_runner(**training):
        variant = cfg.with_overrides({f"training.{key}": value for key, value in training.items()})
        engine = deepspeed_engine(variant, build_model(variant).model, "bench")
        engine.train()
        device_batch = {name: value.to(engine.device) for name, value in batch.items()}

        def step():
            loss = engine(**device_batch).loss
            engine.backward(loss)
            engine.step()
        return step

    with single_process_group():
        variants = {"plain PyTorch + PEFT": plain_runner(), "DeepSpeed ZeRO 0 (FedFM default)": deepspeed_runner(),
                    "DeepSpeed ZeRO 2": deepspeed_runner(zero_stage=2),
                    "DeepSpeed ZeRO 0 bf16": deepspeed_runner(bf16=True)}
        timings: dict[str, list[float]] = defaultdict(list)
        for step in variants.values():  # warm-up: allocator, first-call paths
            for _ in range(3):
                step()
        for _ in range(steps // block):  # alternate blocks so drift in machine load hits every variant alike
            for name, step in variants.items():
                started = time.perf_counter()
                for _ in range(block):
                    step()
                timings[name].append((time.perf_counter() - started) / block)
    plain = statistics.median(timings["plain PyTorch + PEFT"])
    print(f"   {'variant':34s} {'median ms/step':>14s} {'plain/variant':>14s}")
    for name, values in timings.items():
        median = statistics.median(values)
        print(f"   {name:34s} {median * 1000:14.1f} {plain / median:14.3f}")
    ratio = plain / statistics.median(timings["DeepSpeed ZeRO 0 (FedFM default)"])
    print(f"   DeepSpeed (FedFM default) speed relative to plain: {ratio:.3f}× "
          f"(target >= 0.95: {'met' if ratio >= 0.95 else 'NOT met'})")


# --- 2. kfp.local pipeline overhead ------------------------------------------------------------

_LOG_LINE = re.compile(r"^(\d\d):(\d\d):(\d\d)\.(\d{3}) - INFO - (?:Executing task '([^']+)'|Task '([^']+)' finished)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _task_walls(log_text: str) -> dict[str, list[float]]:
    """Per KFP task name, the start and finish times (seconds) of each of its executions."""
    starts: dict[str, list[float]] = defaultdict(list)
    finishes: dict[str, list[float]] = defaultdict(list)
    for raw in log_text.splitlines():
        match = _LOG_LINE.match(_ANSI.sub("", raw))
        if not match:
            continue
        hours, minutes, seconds, millis, started, finished = match.groups()
        moment = int(hours) * 3600 + int(minutes) * 60 + int(seconds) + int(millis) / 1000
        (starts[started] if started else finishes[finished]).append(moment)
    return {name: [starts[name], finishes[name]] for name in starts}


def _round_of(task: str) -> int:
    """KFP names repeated tasks name, name-2, name-3…; evaluate's first run is round 0."""
    base, _, suffix = task.rpartition("-")
    index = int(suffix) if suffix.isdigit() and base else 1
    return index - 1 if task.startswith("evaluate") else index


def pipeline_overhead(rounds: int, clients: int) -> None:
    from fedfm.config import FederationConfig
    from fedfm.data import resolve_labels
    from fedfm.pipelines.local_runner import run_local

    cfg = resolve_labels(FederationConfig.parse({
        "clients": clients, "rounds": rounds, "data": {"partition": "iid", "max_samples": 800},
        "model": {"max_length": 64}, "training": {"local_steps": 10}}))
    with tempfile.TemporaryDirectory(prefix="fedfm-overhead-") as scratch:
        run = run_local(cfg, Path(scratch) / "run")
        walls = _task_walls((run.output / "run.log").read_text())
        metrics = json.loads(run.metrics_path.read_text())
    print(f"\n2. kfp.local overhead: {clients} clients, {rounds} rounds, 10 local steps, MiniLM "
          f"(pipeline wall {run.seconds:.1f} s)")
    kinds: dict[str, list[float]] = defaultdict(list)
    for name, (starts, finishes) in walls.items():
        if len(starts) == len(finishes):
            kinds[name.rstrip("-0123456789")].append((sum(finishes) - sum(starts)) / len(starts))
    print(f"   {'task':18s} {'mean wall s':>11s}")
    for kind, values in sorted(kinds.items()):
        print(f"   {kind:18s} {statistics.mean(values):11.2f}")

    loops = [c["seconds"] for r in metrics["rounds"] for c in r["clients"].values()]
    setups = [c["setup_seconds"] for r in metrics["rounds"] for c in r["clients"].values()]
    client_wall = statistics.mean(kinds["client-finetune"])
    print(f"   client task: {client_wall:.2f} s wall = training loop {statistics.mean(loops):.2f} s + in-step setup "
          f"(model, data, DeepSpeed) {statistics.mean(setups):.2f} s + process/imports/artifacts "
          f"{client_wall - statistics.mean(loops) - statistics.mean(setups):.2f} s")
    print(f"   overhead per client task beyond training: {client_wall - statistics.mean(loops):.2f} s")
    concurrency = min(cfg.parallelism, 2, clients)
    for record in metrics["rounds"][1:]:
        round_tasks = {name: times for name, times in walls.items()
                       if name.startswith(("client-finetune", "aggregate")) and _round_of(name) == record["round"]}
        begin = min(min(starts) for starts, _ in round_tasks.values())
        end = max(max(finishes) for _, finishes in round_tasks.values())
        training = sum(c["seconds"] for c in record["clients"].values()) / concurrency
        print(f"   round {record['round']}: fine-tune + aggregate wall {end - begin:.1f} s, training "
              f"{training:.1f} s (Σ loops / {concurrency} concurrent) → overhead {end - begin - training:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
