"""Run by the Flower venv (scripts/testenv/flwr-venv.sh): Flower's own aggregation of the given client
weights. Usage: python flower_reference.py IN.npz OUT.npz RULE [PARAMS_JSON]

IN holds ``n`` (clients), ``k`` (arrays per client), ``w{i}_{j}`` and ``examples``; OUT gets ``r{j}``.
"""

import json
import sys

import numpy as np
from flwr.server.strategy import aggregate as flower

inputs = np.load(sys.argv[1])
rule, params = sys.argv[3], json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
n, k = int(inputs["n"]), int(inputs["k"])
results = [([inputs[f"w{i}_{j}"] for j in range(k)], int(inputs["examples"][i])) for i in range(n)]
if rule == "fedavg":
    out = flower.aggregate(results)
elif rule == "fedmedian":
    out = flower.aggregate_median(results)
elif rule == "fedtrimmedavg":
    out = flower.aggregate_trimmed_avg(results, params["beta"])
elif rule == "krum":
    out = flower.aggregate_krum(results, params["num_malicious"], params.get("to_keep", 0))
else:
    raise SystemExit(f"unknown rule {rule}")
np.savez(sys.argv[2], **{f"r{j}": np.asarray(array) for j, array in enumerate(out)})
