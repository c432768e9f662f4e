"""What secure aggregation (fedfm.trust.secagg) costs per client and on the server, against plain aggregation.

    python bench/secagg.py [--clients 8 32 100] [--elements 700000] [--fraction-bits 24] [--drop 0.1]

For each number of clients n, one round runs in this process, client after client, with threshold
t = n // 2 + 1 and an update of ``--elements`` float32 values per client (700,000 by default: nine
times the 75,268 of the default all-MiniLM-L6-v2 r = 8 adapter), drawn from a fixed seed:

- per client, the mean wall time of each phase: encode (float32 → ring), advertise, share_keys, mask
  (n − 1 pairwise masks plus the self mask), reveal (decrypting n − 1 ciphertexts);
- on the server, two cases from the same masked inputs: every client survives, and ``--drop`` of the
  clients (10 %, at least one) drop after masking (their masked input never arrives, so the server must
  reconstruct their mask keys and remove n − 1 − dropped pairwise masks for each): the time to sum the
  masked inputs as they arrive (``add_masked``), ``unmask`` and ``decode`` (median of 3 calls), against
  plain aggregation, summing the same clients' float32 vectors (``np.add`` into an accumulator);
- bytes per client, up and down, as ``len()`` of the serialized messages (JSON for keys, ciphertexts and
  reveals, 8 bytes per element for the masked input): against plain aggregation's 4 bytes per element up.
  The global model going down is the same in both and left out.

Each unmasked sum is checked bit-exact against the sum of the survivors' encodings.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from fedfm.trust import secagg, signing  # noqa: E402

CONTEXT = b"bench/round-1"
SEED = 2017
REPEATS = 3


def client_update(index: int, elements: int) -> np.ndarray:
    """The float32 update of one client, regenerated from the seed whenever needed (never all held at once)."""
    return (np.random.default_rng([SEED, index]).standard_normal(elements, dtype=np.float32) * 0.01)


def size(message) -> int:
    return len(json.dumps(message).encode())


class Timer:
    """Seconds spent per named phase, one entry per call."""

    def __init__(self):
        self.calls: dict[str, list[float]] = {}

    def run(self, phase: str, function, *args):
        start = time.perf_counter()
        result = function(*args)
        self.calls.setdefault(phase, []).append(time.perf_counter() - start)
        return result

    def mean(self, phase: str) -> float:
        return statistics.fmean(self.calls[phase])

    def median(self, phase: str) -> float:
        return statistics.median(self.calls[phase])

    def total(self, phase: str) -> float:
        return sum(self.calls[phase])


def bench(n: int, elements: int, bits: int, drop: float) -> dict:
    """One round with n clients; per-client and server timings, bytes per client, the exactness check."""
    threshold = n // 2 + 1
    names = [f"client-{i:03d}" for i in range(n)]
    count = max(1, round(drop * n)) if drop > 0 else 0
    dropped = set(names[1::max(1, n // count)][:count]) if count else set()  # spread over the sorted names
    survivors = [name for name in names if name not in dropped]
    timer = Timer()
    up: dict[str, list[int]] = {}
    down: dict[str, list[int]] = {}

    identities = {name: Ed25519PrivateKey.generate() for name in names}
    registry = {name: signing.public_key(key) for name, key in identities.items()}
    states, public = {}, {}
    for name in names:
        states[name], public[name] = timer.run("advertise", secagg.advertise, name, identities[name], CONTEXT)
        up.setdefault("advertise", []).append(size(public[name]))
    sent = {}
    for name in names:
        down.setdefault("advertised keys (U1)", []).append(size(public))
        states[name], sent[name] = timer.run("share_keys", secagg.share_keys, name, states[name], public, threshold,
                                             CONTEXT, registry)
        up.setdefault("share ciphertexts", []).append(size(sent[name]))

    expected = {"all": np.zeros(elements, np.uint64), "dropped": np.zeros(elements, np.uint64)}
    sums: dict[str, np.ndarray | None] = {"all": None, "dropped": None}
    plain = {"all": np.zeros(elements, np.float32), "dropped": np.zeros(elements, np.float32)}
    plain_time = {"all": 0.0, "dropped": 0.0}
    for index, name in enumerate(names):
        update = client_update(index, elements)
        vector, layout = timer.run("encode", secagg.encode, {"update": torch.from_numpy(update)}, bits)
        down.setdefault("U2 (names)", []).append(size(names))
        masked = timer.run("mask", secagg.mask, name, states[name], public, vector, CONTEXT, registry)
        up.setdefault("masked input", []).append(len(secagg.vector_to_bytes(masked)))
        for case in ("all", "dropped"):
            if case == "dropped" and name in dropped:
                continue
            sums[case] = timer.run(f"server sum {case}", secagg.add_masked, sums[case], masked)
            expected[case] += vector
            start = time.perf_counter()
            np.add(plain[case], update, out=plain[case])
            plain_time[case] += time.perf_counter() - start

    results = {"n": n, "t": threshold, "dropped": len(dropped), "plain": plain_time}
    for case, alive in (("all", names), ("dropped", survivors)):
        # each case from the states before the consistency check: a client confirms one survivor set per round
        confirmed, confirmations, revealed = {}, {}, {}
        for name in alive:
            confirmed[name], confirmations[name] = timer.run(f"confirm {case}", secagg.confirm, name, states[name],
                                                             public, alive, CONTEXT, identities[name], registry)
            up.setdefault(f"confirm ({case})", []).append(size(confirmations[name]))
        for name in alive:
            inbox = {sender: ciphertexts[name] for sender, ciphertexts in sent.items() if sender != name}
            down.setdefault(f"inbox + U3 + confirmations ({case})", []).append(
                size(inbox) + size(alive) + size(confirmations))
            revealed[name] = timer.run(f"reveal {case}", secagg.reveal, name, confirmed[name], public, inbox, alive,
                                       confirmations, CONTEXT, registry)
            up.setdefault(f"reveal ({case})", []).append(size(revealed[name]))
        for _ in range(REPEATS):  # unmask and decode are pure: the median of a few calls
            total = timer.run(f"unmask {case}", secagg.unmask, sums[case], public, alive, revealed, threshold,
                              CONTEXT, registry)
        if not np.array_equal(total, expected[case]):
            raise SystemExit(f"n={n}, {case}: the unmasked sum differs from the sum of the encodings")
        for _ in range(REPEATS):
            decoded = timer.run(f"decode {case}", secagg.decode, total, layout, bits)["update"].numpy()
        error = float(np.abs(decoded - plain[case]).max())
        if error > len(alive) * 2.0**-bits + 1e-6:
            raise SystemExit(f"n={n}, {case}: decoded sum off the float sum by {error}")
    results["timer"] = timer
    results["up"] = {key: statistics.fmean(values) for key, values in up.items()}
    results["down"] = {key: statistics.fmean(values) for key, values in down.items()}
    return results


def kb(value: float) -> str:
    return f"{value / 1e3:,.1f}"


def ms(value: float) -> str:
    return f"{value * 1e3:,.1f}"


def table(all_results: list[dict], elements: int) -> None:
    """Rows of figures, one column per n."""
    header = "".join(f"{'n=' + str(r['n']) + ' t=' + str(r['t']) + ' drop=' + str(r['dropped']):>24}"
                     for r in all_results)
    width = 44

    def row(label: str, values: list[str]) -> None:
        print(f"{label:<{width}}" + "".join(f"{v:>24}" for v in values))

    print(f"\n{'client, mean per client (ms)':<{width}}{header}")
    for phase, label in (("encode", "encode"), ("advertise", "advertise"), ("share_keys", "share_keys"),
                         ("mask", "mask"), ("confirm all", "confirm (no dropout)"),
                         ("reveal all", "reveal (no dropout)"), ("reveal dropped", "reveal (dropouts)")):
        row(label, [ms(r["timer"].mean(phase)) for r in all_results])
    print(f"\n{'server, per round (ms)':<{width}}{header}")
    for case, label in (("all", "no dropout"), ("dropped", "dropouts")):
        row(f"sum masked inputs ({label})", [ms(r["timer"].total(f"server sum {case}")) for r in all_results])
        row(f"unmask ({label})", [ms(r["timer"].median(f"unmask {case}")) for r in all_results])
        row(f"decode ({label})", [ms(r["timer"].median(f"decode {case}")) for r in all_results])
        secure = [r["timer"].total(f"server sum {case}") + r["timer"].median(f"unmask {case}")
                  + r["timer"].median(f"decode {case}") for r in all_results]
        row(f"secure total ({label})", [ms(s) for s in secure])
        row(f"plain float32 sum ({label})", [ms(r["plain"][case]) for r in all_results])
        row(f"  secure / plain ({label})", [f"{s / r['plain'][case]:,.0f}x" for s, r in zip(secure, all_results)])
    print(f"\n{'bytes per client, up (kB)':<{width}}{header}")
    for key in all_results[0]["up"]:
        row(key, [kb(r["up"][key]) for r in all_results])
    totals = [sum(r["up"][key] for key in ("advertise", "share ciphertexts", "masked input", "confirm (dropped)",
                                           "reveal (dropped)")) for r in all_results]
    row("total up (dropouts)", [kb(t) for t in totals])
    row("plain float32 update", [kb(4 * elements) for _ in all_results])
    row("  secure / plain", [f"{t / (4 * elements):.3f}x" for t in totals])
    print(f"\n{'bytes per client, down (kB), beyond the model':<{width}}{header}")
    for key in all_results[0]["down"]:
        row(key, [kb(r["down"][key]) for r in all_results])
    row("plain", ["0.0" for _ in all_results])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[8, 32, 100], help="numbers of clients")
    parser.add_argument("--elements", type=int, default=700_000, help="values per client update")
    parser.add_argument("--fraction-bits", type=int, default=24)
    parser.add_argument("--drop", type=float, default=0.1, help="share of clients dropping after masking")
    args = parser.parse_args()
    torch.set_num_threads(1)
    bench(3, 1000, args.fraction_bits, args.drop)  # warm-up: first calls into torch, numpy and OpenSSL
    results = []
    for n in args.clients:
        start = time.perf_counter()
        results.append(bench(n, args.elements, args.fraction_bits, args.drop))
        print(f"n={n}: round simulated and checked exact in {time.perf_counter() - start:.1f} s", flush=True)
    print(f"\n{args.elements:,} elements per client, {args.fraction_bits} fraction bits, t = n // 2 + 1; "
          f"times are wall clock on this machine")
    table(results, args.elements)


if __name__ == "__main__":
    main()
