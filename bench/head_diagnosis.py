"""Where a federated classification run's head goes under label skew: read a finished ``fedfm simulate`` run.

    python bench/head_diagnosis.py RUN_DIR [--tenants]

``RUN_DIR`` is a simulate run's directory (``bench/quality.py --engine simulate`` leaves one per run under
``--output``): its ``work/round-N/`` hold every round's global adapter and the clients' updates. Per round
it prints, over the tenants (``--tenants``: for each tenant too):

- ``held`` / ``lacked``: the mean L2 norm of a tenant's change to the head's weight rows of the classes it
  holds, and of those it lacks (its training pushes those away from its own features);
- ``kept``: per class, the norm of the round's change to the global row over the mean norm of the changes
  its holders made, median over the classes: how much of the holders' change the average keeps (FedAvg
  with a class held by one of 8 equal tenants keeps about 1/8);
- ``lora`` / ``head``: the mean norm of a tenant's update to the LoRA layers and to the head.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch


def diagnose(run_dir: Path, *, tenants: bool = False, stream=sys.stdout) -> list[dict]:
    from fedfm.adapters import load_adapter
    from fedfm.config import FederationConfig
    from fedfm.data import load_client_data, resolve_labels
    from fedfm.head import class_counts, class_row_tensors
    from fedfm.lora import is_lora_a, is_lora_b

    cfg = resolve_labels(FederationConfig.parse(json.loads((run_dir / "run.json").read_text())["config"]))
    labels = len(cfg.data.labels)
    held = {client: torch.tensor(class_counts(load_client_data(cfg, client).train["label"], labels)) > 0
            for client in cfg.training_clients}
    work, rows = run_dir / "work", []
    print(f"{run_dir}: {len(held)} client(s), {labels} classes; classes held per client: "
          + ", ".join(str(int(mask.sum())) for mask in held.values()), file=stream)
    print(f"{'round':>5} {'held':>8} {'lacked':>8} {'kept':>6} {'lora':>8} {'head':>8}", file=stream)
    round_index = 1
    while (work / f"round-{round_index}" / "updates").is_dir():
        before = load_adapter(str(work / f"round-{round_index - 1}" / "global_adapter.safetensors")).tensors
        after = load_adapter(str(work / f"round-{round_index}" / "global_adapter.safetensors")).tensors
        weight = next(name for name in class_row_tensors(before, labels) if before[name].dim() == 2)
        global_change = (after[weight] - before[weight]).norm(dim=1)
        holder_change = torch.zeros(labels)
        holders = torch.zeros(labels)
        per_tenant = []
        for path in sorted((work / f"round-{round_index}" / "updates").glob("*.safetensors")):
            update = load_adapter(str(path)).tensors
            client = path.stem
            change = update[weight].norm(dim=1)
            mask = held[client]
            holder_change += torch.where(mask, change, torch.zeros_like(change))
            holders += mask.float()
            lora = sum(float(v.pow(2).sum()) for n, v in update.items() if is_lora_a(n) or is_lora_b(n)) ** 0.5
            head = sum(float(v.pow(2).sum()) for n, v in update.items() if not (is_lora_a(n) or is_lora_b(n))) ** 0.5
            per_tenant.append({"client": client, "held": float(change[mask].mean()),
                               "lacked": float(change[~mask].mean()) if (~mask).any() else float("nan"),
                               "lora": lora, "head": head})
        some = holders > 0
        kept = global_change[some] / (holder_change[some] / holders[some])
        row = {"round": round_index, "kept": float(kept.median()),
               **{key: _mean(t[key] for t in per_tenant) for key in ("held", "lacked", "lora", "head")}}
        rows.append(row)
        print(f"{round_index:5d} {row['held']:8.4f} {row['lacked']:8.4f} {row['kept']:6.3f} {row['lora']:8.4f} "
              f"{row['head']:8.4f}", file=stream)
        if tenants:
            for t in per_tenant:
                print(f"{'':5} {t['held']:8.4f} {t['lacked']:8.4f} {'':6} {t['lora']:8.4f} {t['head']:8.4f}  "
                      f"{t['client']}", file=stream)
        round_index += 1
    return rows


def _mean(values) -> float:
    """The mean of the values that are numbers (a tenant holding every class lacks none: NaN)."""
    numbers = [value for value in values if value == value]
    return statistics.fmean(numbers) if numbers else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--tenants", action="store_true", help="each tenant's figures under each round's")
    args = parser.parse_args()
    if not (args.run_dir / "work").is_dir():
        print(f"{args.run_dir} has no work/ directory: pass a fedfm simulate run's directory", file=sys.stderr)
        return 2
    diagnose(args.run_dir, tenants=args.tenants)
    return 0


if __name__ == "__main__":
    sys.exit(main())
