"""Run by the Flower venv (scripts/testenv/flwr-venv.sh): Flower's own strategy classes over several
rounds. Usage: python flower_reference.py IN.npz OUT.npz RULE [PARAMS_JSON]

IN holds ``rounds``, ``k`` (arrays), the initial global ``g{j}``, and per round ``n{r}`` (clients),
``examples{r}`` and the clients' changes ``d{r}_{i}_{j}``. Each client of round r sends Flower the
round's current global plus its change, so both sides see the same updates whatever the previous
rounds produced. OUT gets each round's new global, ``r{r}_{j}``.
"""

import json
import sys

import numpy as np
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import strategy as flower

CLASSES = {"fedavg": flower.FedAvg, "fedavgm": flower.FedAvgM, "fedadam": flower.FedAdam,
           "fedyogi": flower.FedYogi, "fedadagrad": flower.FedAdagrad, "fedprox": flower.FedProx,
           "fedmedian": flower.FedMedian, "fedtrimmedavg": flower.FedTrimmedAvg, "krum": flower.Krum}

inputs = np.load(sys.argv[1])
rule, params = sys.argv[3], json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
k = int(inputs["k"])
current = [inputs[f"g{j}"] for j in range(k)]
strategy = CLASSES[rule](initial_parameters=ndarrays_to_parameters(current), **params)
outputs = {}
for r in range(int(inputs["rounds"])):
    results = []
    for i in range(int(inputs[f"n{r}"])):
        weights = [current[j] + inputs[f"d{r}_{i}_{j}"] for j in range(k)]
        results.append((None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(weights),
                                     int(inputs[f"examples{r}"][i]), {})))
    parameters, _ = strategy.aggregate_fit(r + 1, results, [])
    current = parameters_to_ndarrays(parameters)
    outputs.update({f"r{r}_{j}": array for j, array in enumerate(current)})
np.savez(sys.argv[2], **outputs)
