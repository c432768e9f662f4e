"""How FedFM behaves as the federation grows: simulate, the operator and the aggregate step at N up to 1,000.

    python bench/scale.py [--only simulate|operator|aggregate ...] [--simulate 10x1,10x10,100x1,100x10,1000x1]
                          [--operator-n 50,200,500] [--aggregate-n 32,100] [--update-mb 50] [--repeats 2]

Each part prints its figures and its elapsed time; scratch files go under one temporary folder, removed at the end.

1. ``fedfm simulate`` (in process, :func:`fedfm.simulation.simulate`): all-MiniLM-L6-v2 with LoRA r = 8, one
   round, N clients per round, each client with its own 20 synthetic rows (16 train, 4 eval; the builtin
   topics sentences, split iid), batch 16, ``training.local_steps`` S; one fresh process per (N, S). Per
   client: the wall time of the round's fine-tunes (the ``client_finetune`` events, from the first start to
   the aggregate step's start: what happens between clients included) / N, the time per optimizer step
   (the updates' loop ``seconds`` / steps), and the fixed per-client overhead = wall − loop (model copy,
   data, DeepSpeed engine, reading the global adapter, writing the update, the garbage collection between
   clients: everything but the optimizer steps) as a ratio of one step; the part of it inside the training
   function before the loop (``setup_seconds``) is shown apart. Peak memory: the process's VmHWM.
   Targets: overhead ≤ 1 step; peak memory flat in N.
2. The operator (``python -m fedfm.operators``, a subprocess) on the real control plane (etcd + kube-apiserver
   + kube-controller-manager v1.20 of tests/cluster, no kubelet: Jobs only have to exist), one fresh control
   plane per N: N tenants, each a namespace with an enrolled FederatedClient, and one Federation; then N
   ClientRounds (``deadlineSeconds`` D) created at once from 8 threads. A watch on Jobs and one on
   ClientRounds (started before) give: the time from the first create until every Job exists, the p50/p99
   of each round's create-to-Job latency (create call returned → its Job's ADDED event), the operator's CPU
   seconds and peak RSS (/proc) over the run, and, at the deadline, the time from the last round's deadline
   (status.deadline) until every round is TimedOut. Targets: linear in N; p99 ≤ 2 s at N = 500.
3. The aggregate step end to end (:func:`fedfm.federation.aggregate_round`: read every update file, verify
   its sha256, validate it, FedAvg, write the new global adapter) over N updates of 50 MB (the LoRA-shaped
   layout of bench/aggregate.py: 192 float32 tensors) on the local disk, against reading the same files'
   bytes (one pass, 8 MiB reads), both with the files in the page cache (warm) and evicted before each call
   (cold, posix_fadvise DONTNEED), alternating, median of ``--repeats``. Target: read time / aggregate time
   ≥ 0.5.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MB = 1e6


def _status_kib(field: str, pid: int | str = "self") -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    return int(match.group(1)) if match else 0


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(share * len(ordered) + 0.5)) - 1))]


def _cpu_busy() -> tuple[int, int]:
    """All CPUs' busy and total clock ticks so far (/proc/stat)."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return sum(fields) - fields[3] - fields[4], sum(fields)


# --- 1. simulate ---------------------------------------------------------------------------------------


ROWS_PER_CLIENT = 20


def simulate_child(clients: int, steps: int, scratch: str) -> None:
    """In a fresh process: one round of ``clients`` clients × ``steps`` local steps; prints its figures."""
    import pandas as pd

    from fedfm.builtin_data import topics
    from fedfm.config import FederationConfig
    from fedfm.simulation import simulate

    work = Path(scratch)
    rows = topics()
    repeats = -(-clients * ROWS_PER_CLIENT // len(rows))
    frame = pd.concat([rows] * repeats, ignore_index=True).head(clients * ROWS_PER_CLIENT)
    data = work / "rows.csv"
    frame.to_csv(data, index=False)
    cfg = FederationConfig.parse({
        "name": "scale", "clients": clients, "rounds": 1,
        "data": {"source": str(data), "partition": "iid", "eval_fraction": 0.2},
        "lora": {"r": 8}, "training": {"local_steps": steps, "batch_size": 16},
    })
    started = time.time()
    simulate(cfg, work / "run")
    total = time.time() - started
    opened: dict[str, float] = {}
    walls: dict[str, float] = {}
    span: list[float] = []  # the round's fine-tunes, from the first one's start to the aggregate step's
    for line in (work / "run" / "events.jsonl").read_text().splitlines():
        event = json.loads(line)
        if event.get("step") == "aggregate" and event["event"] == "started":
            span.append(event["time"])
        if event.get("step") != "client_finetune":
            continue
        if event["event"] == "started":
            opened[event["client"]] = event["time"]
            span[:] = span[:1] if span else [event["time"]]
        elif event["event"] == "finished":
            walls[event["client"]] = event["time"] - opened[event["client"]]
    from fedfm.adapters import read_meta

    figures = []
    for path in sorted((work / "run" / "work" / "round-1" / "updates").glob("*.safetensors")):
        metrics = read_meta(str(path)).metrics
        figures.append({"wall": walls[metrics["client"]], "loop": metrics["seconds"], "steps": metrics["steps"],
                        "setup": metrics["setup_seconds"]})
    print(json.dumps({"clients": figures, "total": total, "span": span[-1] - span[0],
                      "peak_kib": _status_kib("VmHWM")}))


def simulate_part(plan: list[tuple[int, int]], scratch: Path) -> None:
    print(f"\n1. fedfm simulate: all-MiniLM-L6-v2 + LoRA r=8, 1 round, batch 16, {ROWS_PER_CLIENT} rows per client; "
          "one fresh process per row")
    print(f"   {'N':>5s} {'steps':>5s} {'wall/client s':>13s} {'step s':>7s} {'overhead s':>10s} "
          f"{'(setup s)':>9s} {'overhead/step':>13s} {'peak MB':>8s} {'run s':>6s}")
    peaks, ratios = {}, {}
    for clients, steps in plan:
        folder = scratch / f"simulate-{clients}x{steps}"
        folder.mkdir()
        busy, total = _cpu_busy()
        line = subprocess.run([sys.executable, __file__, "--simulate-child", str(clients), str(steps), str(folder)],
                              check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        busy_after, total_after = _cpu_busy()
        shutil.rmtree(folder, ignore_errors=True)
        result = json.loads(line)
        rows = result["clients"]
        if len(rows) != clients:
            raise SystemExit(f"simulate {clients}x{steps}: {len(rows)} updates of {clients}")
        wall = result["span"] / clients  # everything between clients included (a collection, the bookkeeping)
        step = sum(r["loop"] for r in rows) / sum(r["steps"] for r in rows)
        overhead = wall - sum(r["loop"] for r in rows) / clients
        setup = statistics.mean(r["setup"] for r in rows)
        peaks[clients, steps], ratios[clients, steps] = result["peak_kib"] * 1024 / MB, overhead / step
        print(f"   {clients:5d} {steps:5d} {wall:13.3f} {step:7.3f} {overhead:10.3f} {setup:9.3f} "
              f"{overhead / step:13.2f} {peaks[clients, steps]:8.0f} {result['total']:6.0f}"
              f"   (CPUs busy {(busy_after - busy) / max(1, total_after - total):.0%})")
    worst = max(ratios.values())
    print("   (wall/client: the round's fine-tunes, first start to the aggregate step, / N; step and setup:")
    print("   means over the clients; 'setup' is the part of the overhead in the training function before the loop)")
    print(f"   fixed per-client overhead / one step: {min(ratios.values()):.2f}–{worst:.2f} "
          f"(target <= 1: {'met' if worst <= 1 else 'NOT met'})")
    for steps in sorted({s for _, s in peaks}):
        values = {n: peaks[n, s] for n, s in peaks if s == steps}
        low, high = min(values.values()), max(values.values())
        print(f"   peak memory at {steps} step(s) over N = {', '.join(map(str, sorted(values)))}: "
              f"{low:.0f}–{high:.0f} MB (flat, within 10 %: {'met' if high <= 1.1 * low else 'NOT met'})")


# --- 2. the operator ---------------------------------------------------------------------------------


PLATFORM = "platform"
FEDERATION = "scale"
TENANT_PREFIX = "tenant-"


def _proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def operator_run(count: int, deadline: float, scratch: Path, threads: int = 8) -> dict:
    """One fresh control plane and operator; ``count`` tenants and ClientRounds. Returns the figures."""
    sys.path[:0] = [str(REPO / "tests" / "cluster"), str(REPO / "tests")]  # kube.py imports tests/ports.py
    from kube import CRD_DIR, ControlPlane, ensure_binaries, load_manifests  # tests/cluster/kube.py
    from kubernetes import client, watch

    from fedfm.operators.api import (API_VERSION, CLIENT_ROUNDS, FEDERATED_CLIENTS, GROUP, LABEL_CLIENT,
                                     LABEL_CLIENT_ROUND, LABEL_FEDERATION, TRAIN, VERSION)

    ensure_binaries()
    crds = [doc for path in sorted(CRD_DIR.glob("*.yaml")) for doc in load_manifests(path)
            if doc.get("kind") == "CustomResourceDefinition"]
    run_dir = scratch / f"kube-{count}"
    run_dir.mkdir()
    plane = ControlPlane.start(run_dir, crds=crds)
    operator = None
    stop = threading.Event()
    try:
        api = plane.admin
        custom, core = client.CustomObjectsApi(api), client.CoreV1Api(api)
        config = {"name": FEDERATION, "data": {"labels": ["a", "b"]}, "lora": {"r": 8}}
        plane.create_namespace(PLATFORM)
        custom.create_namespaced_custom_object(GROUP, VERSION, PLATFORM, "federations", {
            "apiVersion": API_VERSION, "kind": "Federation", "metadata": {"name": FEDERATION, "namespace": PLATFORM},
            "spec": {"config": config}})
        tenants = [f"{TENANT_PREFIX}{i}" for i in range(count)]

        def enroll(tenant: str) -> None:
            core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=tenant)))
            custom.create_namespaced_custom_object(GROUP, VERSION, tenant, FEDERATED_CLIENTS, {
                "apiVersion": API_VERSION, "kind": "FederatedClient", "metadata": {"name": tenant, "namespace": tenant},
                "spec": {"federationRef": {"name": FEDERATION, "namespace": PLATFORM},
                         "data": {"uri": "file:///data/train.csv"}, "image": "fedfm:bench"}})

        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            list(pool.map(enroll, tenants))

        env = dict(os.environ, KUBECONFIG=plane.kubeconfig, PYTHONUNBUFFERED="1")
        log = open(run_dir / "operator.log", "w")
        operator = subprocess.Popen([sys.executable, "-m", "fedfm.operators", "--metrics-port", "0"], env=env,
                                    stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        # the operator is settled when every tenant is Ready: what it costs with nothing to do comes before
        ready_by = time.monotonic() + 120 + count * 0.5
        while True:
            items = custom.list_cluster_custom_object(GROUP, VERSION, FEDERATED_CLIENTS)["items"]
            if sum((i.get("status") or {}).get("phase") == "Ready" for i in items) == count:
                break
            if time.monotonic() > ready_by or operator.poll() is not None:
                raise RuntimeError(f"the tenants never all became Ready; operator log:\n"
                                   f"{(run_dir / 'operator.log').read_text()[-3000:]}")
            time.sleep(0.5)
        time.sleep(5)
        idle_cpu = _proc_cpu(operator.pid)
        time.sleep(10)
        idle_rate = (_proc_cpu(operator.pid) - idle_cpu) / 10

        jobs_seen: dict[str, float] = {}
        finals: dict[str, tuple[float, str]] = {}
        deadlines: dict[str, str] = {}
        watching = threading.Barrier(3)

        def watch_jobs() -> None:
            stream = watch.Watch()
            batch = client.BatchV1Api(plane.api_client())
            watching.wait()
            for event in stream.stream(batch.list_job_for_all_namespaces, label_selector=LABEL_CLIENT_ROUND,
                                       timeout_seconds=0, _request_timeout=None):
                if event["type"] == "ADDED":
                    jobs_seen.setdefault(event["object"].metadata.name, time.monotonic())
                if stop.is_set():
                    break

        def watch_rounds() -> None:
            stream = watch.Watch()
            rounds = client.CustomObjectsApi(plane.api_client())
            watching.wait()
            for event in stream.stream(rounds.list_cluster_custom_object, GROUP, VERSION, CLIENT_ROUNDS,
                                       timeout_seconds=0):
                body = event["object"]
                status, name = body.get("status") or {}, body["metadata"]["name"]
                if status.get("deadline"):
                    deadlines[name] = status["deadline"]
                if status.get("phase") == "TimedOut" and name not in finals:
                    finals[name] = (time.time(), status.get("reason", ""))
                if stop.is_set():
                    break

        def quietly(target) -> None:  # a watch cut when the control plane stops is no error
            try:
                target()
            except Exception:
                if not stop.is_set():
                    raise

        for target in (watch_jobs, watch_rounds):
            threading.Thread(target=quietly, args=(target,), daemon=True).start()
        watching.wait()
        time.sleep(1)  # the watches' requests are open

        created: dict[str, float] = {}

        def create(tenant: str) -> None:
            name = f"{FEDERATION}-r1-train-{tenant}"
            custom.create_namespaced_custom_object(GROUP, VERSION, tenant, CLIENT_ROUNDS, {
                "apiVersion": API_VERSION, "kind": "ClientRound",
                "metadata": {"name": name, "namespace": tenant,
                             "labels": {LABEL_FEDERATION: FEDERATION, LABEL_CLIENT: tenant}},
                "spec": {"federation": {"name": FEDERATION, "namespace": PLATFORM}, "client": tenant, "round": 1,
                         "runId": "bench", "purpose": TRAIN, "outputURI": f"file:///tmp/{tenant}.safetensors",
                         "globalAdapterURI": "file:///tmp/global.safetensors", "config": config,
                         "deadlineSeconds": deadline}})
            created[name] = time.monotonic()

        cpu_before, busy_before = _proc_cpu(operator.pid), _cpu_busy()
        first = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            list(pool.map(create, tenants))
        created_all = time.monotonic() - first
        limit = time.monotonic() + 60 + count * 1.0
        while len(jobs_seen) < count and time.monotonic() < limit:
            time.sleep(0.05)
        jobs_all = max(jobs_seen.values()) - first if jobs_seen else float("nan")
        latencies = [jobs_seen[name] - created[name] for name in created if name in jobs_seen]
        cpu_jobs = _proc_cpu(operator.pid) - cpu_before
        limit = time.time() + deadline + 120 + count * 1.0
        while len(finals) < count and time.time() < limit:
            time.sleep(0.1)
        stop.set()
        cpu_total = _proc_cpu(operator.pid) - cpu_before
        busy_after = _cpu_busy()
        from fedfm.operators.kube import parse_time

        late = [finals[name][0] - parse_time(deadlines[name]).timestamp() for name in finals if name in deadlines]
        last_deadline = max(parse_time(value).timestamp() for value in deadlines.values()) if deadlines else None
        return {
            "count": count, "created_all": created_all, "jobs": len(jobs_seen), "jobs_all": jobs_all,
            "p50": _percentile(latencies, 0.5) if latencies else float("nan"),
            "p99": _percentile(latencies, 0.99) if latencies else float("nan"),
            "max": max(latencies, default=float("nan")),
            "cpu_jobs": cpu_jobs, "cpu_total": cpu_total, "idle_rate": idle_rate,
            "peak_mb": _status_kib("VmHWM", operator.pid) * 1024 / MB, "timed_out": len(finals),
            "reasons": sorted({reason for _, reason in finals.values()}),
            "timeout_all": (max(t for t, _ in finals.values()) - last_deadline) if finals and last_deadline else None,
            "late_p50": _percentile(late, 0.5) if late else None, "late_max": max(late, default=None),
            "busy": (busy_after[0] - busy_before[0]) / max(1, busy_after[1] - busy_before[1]),
        }
    finally:
        stop.set()
        if operator is not None:
            operator.terminate()
            try:
                operator.wait(20)
            except subprocess.TimeoutExpired:
                operator.kill()
        plane.stop()


def operator_part(counts: list[int], deadline: float, scratch: Path) -> None:
    print(f"\n2. operator: N tenants (namespace + FederatedClient) and N ClientRounds created at once "
          f"(8 threads), deadlineSeconds {deadline:g}; one fresh control plane (v1.20, no kubelet) per N")
    print(f"   {'N':>4s} {'create s':>8s} {'all Jobs s':>10s} {'p50 s':>6s} {'p99 s':>6s} {'max s':>6s} "
          f"{'CPU s (Jobs)':>12s} {'CPU s (all)':>11s} {'idle CPU':>8s} {'peak MB':>7s} {'TimedOut s':>10s} "
          f"{'lag p50/max':>11s}")
    results = []
    for count in counts:
        started = time.monotonic()
        r = operator_run(count, deadline, scratch)
        results.append(r)
        timeout = f"{r['timeout_all']:.1f}" if r["timeout_all"] is not None else "-"
        lag = f"{r['late_p50']:.1f}/{r['late_max']:.1f}" if r["late_p50"] is not None else "-"
        print(f"   {count:4d} {r['created_all']:8.2f} {r['jobs_all']:10.2f} {r['p50']:6.2f} {r['p99']:6.2f} "
              f"{r['max']:6.2f} {r['cpu_jobs']:12.1f} {r['cpu_total']:11.1f} {r['idle_rate']:7.0%} "
              f"{r['peak_mb']:7.0f} {timeout:>10s} {lag:>11s}   ({time.monotonic() - started:.0f} s, "
              f"CPUs busy {r['busy']:.0%}; {r['jobs']}/{count} Jobs, {r['timed_out']}/{count} TimedOut "
              f"{','.join(r['reasons'])})")
    print("   'idle CPU': the operator's CPU share with every tenant Ready and no round (its status timers);")
    print("   'TimedOut s': from the last round's status.deadline until every round was TimedOut; 'lag': each")
    print("   round's TimedOut time after its own deadline (deadlines are written to the second)")
    last = results[-1]
    print(f"   p99 create-to-Job at N = {last['count']}: {last['p99']:.2f} s "
          f"(target <= 2 s: {'met' if last['p99'] <= 2 else 'NOT met'})")
    if len(results) > 1:
        first = results[0]
        grow = last["count"] / first["count"]
        print(f"   N x{grow:g}: all-Jobs time x{last['jobs_all'] / first['jobs_all']:.1f}, "
              f"CPU (Jobs) x{last['cpu_jobs'] / max(first['cpu_jobs'], 1e-9):.1f}, "
              f"peak memory x{last['peak_mb'] / first['peak_mb']:.2f} (linear: x{grow:g} or less)")


# --- 3. the aggregate step ---------------------------------------------------------------------------


def _layout(update_mb: float) -> list[tuple[str, tuple[int, int]]]:
    """bench/aggregate.py's layout (rank 16 on q, k, v, o of 24 layers), 4096 wide for 50 MB, else scaled."""
    hidden = 4096 if update_mb == 50 else max(16, int(4096 * update_mb / 50.33))
    return [(f"base_model.model.model.layers.{layer}.self_attn.{module}_proj.lora_{part}.weight", shape)
            for layer in range(24) for module in "qkvo"
            for part, shape in (("A", (16, hidden)), ("B", (hidden, 16)))]


def _evict(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _read_all(paths: list[Path], chunk: int = 8 << 20) -> int:
    buffer = bytearray(chunk)
    view, total = memoryview(buffer), 0
    for path in paths:
        with open(path, "rb", buffering=0) as handle:
            while True:
                got = handle.readinto(view)
                if not got:
                    break
                total += got
    return total


def aggregate_part(counts: list[int], update_mb: float, repeats: int, scratch: Path) -> None:
    import numpy as np
    import torch

    from fedfm.adapters import AdapterMeta, save_adapter
    from fedfm.config import FederationConfig
    from fedfm.federation import aggregate_round

    layout = _layout(update_mb)
    size = sum(rows * cols for _, (rows, cols) in layout) * 4
    print(f"\n3. aggregate step (aggregate_round: read, verify sha256, validate, FedAvg, write) over N updates of "
          f"{size / MB:.1f} MB ({len(layout)} tensors) vs reading the same files; median of {repeats}, alternating")
    print(f"   {'N':>4s} {'cache':>5s} {'read s':>7s} {'read GB/s':>9s} {'aggregate s':>11s} {'GB/s':>6s} "
          f"{'read/aggregate':>14s}")
    folder = scratch / "aggregate"
    folder.mkdir()
    peft = {"r": 16, "lora_alpha": 32}
    global_uri = str(folder / "global.safetensors")
    save_adapter(global_uri, {name: torch.zeros(shape) for name, shape in layout},
                 AdapterMeta(kind="global", base_model="bench", peft_config=peft, round=0))
    made = 0
    ratios = []
    rng = np.random.default_rng(7)
    for count in counts:
        while made < count:  # updates are shared by the N's: the first N files
            flat = torch.from_numpy(rng.standard_normal(size // 4, dtype=np.float32) * 1e-3)
            tensors, offset = {}, 0
            for name, (rows, cols) in layout:
                tensors[name] = flat[offset:offset + rows * cols].view(rows, cols)
                offset += rows * cols
            save_adapter(str(folder / f"c{made}.safetensors"), tensors,
                         AdapterMeta(kind="update", base_model="bench", peft_config=peft, round=1,
                                     samples=100 + made, client=f"tenant-{made}"))
            made += 1
        paths = [folder / f"c{i}.safetensors" for i in range(count)]
        volume = sum(path.stat().st_size for path in paths)
        cfg = FederationConfig.parse({"name": "scale", "clients": count, "strategy": {"name": "fedavg"}})
        pairs = [(client.name, str(path)) for client, path in zip(cfg.clients, paths)]
        for cold in (False, True):
            reads, aggregates = [], []
            for attempt in range(repeats + (0 if cold else 1)):  # warm: one warm-up call of each first
                if cold:
                    _evict(paths)
                started = time.perf_counter()
                if _read_all(paths) != volume:
                    raise SystemExit("short read")
                reads.append(time.perf_counter() - started)
                if cold:
                    _evict(paths)
                out = folder / f"out-{count}-{cold}-{attempt}"
                started = time.perf_counter()
                meta = aggregate_round(cfg, 1, global_uri, pairs, str(out / "global.safetensors"),
                                       state_out=str(out / "state"))
                aggregates.append(time.perf_counter() - started)
                shutil.rmtree(out)
                if len(meta.metrics["counted"]) != count:
                    raise SystemExit(f"aggregate counted {len(meta.metrics['counted'])} of {count}")
            if not cold:
                reads, aggregates = reads[1:], aggregates[1:]
            read, aggregate = statistics.median(reads), statistics.median(aggregates)
            ratios.append(read / aggregate)
            print(f"   {count:4d} {'cold' if cold else 'warm':>5s} {read:7.2f} {volume / read / 1e9:9.2f} "
                  f"{aggregate:11.2f} {volume / aggregate / 1e9:6.2f} {read / aggregate:14.2f}")
    worst = min(ratios)
    verdict = "met" if worst >= 0.5 else "NOT met"
    print(f"   read / aggregate: {worst:.2f}–{max(ratios):.2f} (target >= 0.5: {verdict})")


# --- main ------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", choices=("simulate", "operator", "aggregate"),
                        help="run only this part (repeatable); default: all three")
    parser.add_argument("--simulate", default="10x1,10x10,100x1,100x10,1000x1",
                        help="comma-separated CLIENTSxSTEPS runs of part 1")
    parser.add_argument("--operator-n", default="50,200,500", help="comma-separated N for part 2")
    parser.add_argument("--deadline", type=float, default=30.0, help="the ClientRounds' deadlineSeconds (part 2)")
    parser.add_argument("--aggregate-n", default="32,100", help="comma-separated N for part 3")
    parser.add_argument("--update-mb", type=float, default=50.0, help="size of one update (part 3)")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per variant (part 3)")
    parser.add_argument("--simulate-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if args.simulate_child:
        simulate_child(int(args.simulate_child[0]), int(args.simulate_child[1]), args.simulate_child[2])
        return 0
    parts = args.only or ["simulate", "operator", "aggregate"]
    elapsed = {}
    with tempfile.TemporaryDirectory(prefix="fedfm-bench-scale-") as scratch:
        for part in parts:
            started = time.monotonic()
            if part == "simulate":
                plan = [tuple(int(x) for x in item.split("x")) for item in args.simulate.split(",")]
                simulate_part(plan, Path(scratch))
            elif part == "operator":
                operator_part([int(n) for n in args.operator_n.split(",")], args.deadline, Path(scratch))
            else:
                aggregate_part([int(n) for n in args.aggregate_n.split(",")], args.update_mb, args.repeats,
                               Path(scratch))
            elapsed[part] = time.monotonic() - started
            print(f"   ({part}: {elapsed[part]:.0f} s)", flush=True)
    print("\nelapsed: " + ", ".join(f"{part} {seconds:.0f} s" for part, seconds in elapsed.items())
          + f"; total {sum(elapsed.values()):.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
