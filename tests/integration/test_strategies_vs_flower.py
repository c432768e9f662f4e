"""Differential tests: FedFM's aggregation rules against Flower's own strategy classes, over several
rounds, on the same inputs.

Flower aggregates client *weights*; FedFM aggregates *updates* (weights − global). Each round both
sides start from their own current global and every client sends that global plus the same change,
so the new globals must agree within 1e-6 (relative) round after round — server state (momentum,
moments) included. Flower runs in its own venv (scripts/testenv/flwr-venv.sh: its pins conflict
with FedFM's stack), fed through files.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from fedfm.adapters import Adapter, AdapterMeta
from fedfm.config import StrategyConfig
from fedfm.strategies import build_strategy

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent
ROUNDS = 4
SHAPES = {"lora_A": (4, 16), "lora_B": (16, 4), "head": (3,)}


@pytest.fixture(scope="session")
def flower_python() -> str:
    return subprocess.run([str(ROOT / "scripts" / "testenv" / "flwr-venv.sh")], capture_output=True, text=True,
                          check=True).stdout.strip()


def _initial(seed: int):
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=generator) for name, shape in SHAPES.items()}


def _updates(seed: int, clients: int, outliers: int = 0) -> list[Adapter]:
    """``clients`` float32 updates; the first ``outliers`` are far off (attackers)."""
    generator = torch.Generator().manual_seed(seed)
    updates = []
    for index in range(clients):
        scale = 50.0 if index < outliers else 0.1
        tensors = {name: scale * torch.randn(shape, generator=generator) for name, shape in SHAPES.items()}
        samples = int(torch.randint(10, 200, (1,), generator=generator))
        updates.append(Adapter(tensors, AdapterMeta(kind="update", base_model="m", peft_config={}, round=1,
                                                    samples=samples, client=f"c{index}")))
    return updates


def _flower(python: str, tmp_path: Path, initial, rounds: list[list[Adapter]], rule: str, params: dict):
    """Flower's new global after each round."""
    names = sorted(initial)
    arrays = {"rounds": len(rounds), "k": len(names)}
    arrays.update({f"g{j}": initial[name].double().numpy() for j, name in enumerate(names)})
    for r, updates in enumerate(rounds):
        arrays[f"n{r}"] = len(updates)
        arrays[f"examples{r}"] = np.array([update.meta.samples for update in updates])
        for i, update in enumerate(updates):
            arrays.update({f"d{r}_{i}_{j}": update.tensors[name].double().numpy() for j, name in enumerate(names)})
    np.savez(tmp_path / "in.npz", **arrays)
    subprocess.run([python, str(TESTS / "flower_reference.py"), str(tmp_path / "in.npz"), str(tmp_path / "out.npz"),
                    rule, json.dumps(params)], check=True, capture_output=True, text=True)
    result = np.load(tmp_path / "out.npz")
    return [{name: result[f"r{r}_{j}"] for j, name in enumerate(names)} for r in range(len(rounds))]


# (rule, our params, Flower's class params, clients, outliers)
CASES = [
    ("fedavg", {}, {}, 7, 0),
    ("fedavgm", {"server_learning_rate": 0.7, "server_momentum": 0.9},
     {"server_learning_rate": 0.7, "server_momentum": 0.9}, 6, 0),
    ("fedadam", {"eta": 0.05, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3},
     {"eta": 0.05, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}, 6, 0),
    ("fedyogi", {"eta": 0.05, "beta_1": 0.8, "beta_2": 0.95, "tau": 1e-2},
     {"eta": 0.05, "beta_1": 0.8, "beta_2": 0.95, "tau": 1e-2}, 6, 0),
    ("fedadagrad", {"eta": 0.1, "tau": 1e-3}, {"eta": 0.1, "tau": 1e-3}, 6, 0),
    ("fedprox", {"mu": 0.1}, {"proximal_mu": 0.1}, 5, 0),  # the server side of FedProx is FedAvg
    ("fedmedian", {}, {}, 7, 2),
    ("fedmedian", {}, {}, 8, 2),  # even: the mean of the two middle values
    ("fedtrimmedavg", {"beta": 0.2}, {"beta": 0.2}, 10, 2),
    ("fedtrimmedavg", {"beta": 0.0}, {"beta": 0.0}, 5, 0),
    ("krum", {"num_malicious": 2}, {"num_malicious_clients": 2}, 9, 2),
    ("krum", {"num_malicious": 1, "to_keep": 3}, {"num_malicious_clients": 1, "num_clients_to_keep": 3}, 9, 1),
    ("multikrum", {"num_malicious": 2}, {"num_malicious_clients": 2, "num_clients_to_keep": 7}, 9, 2),
]


@pytest.mark.parametrize("rule, ours, theirs, clients, outliers", CASES,
                         ids=[f"{c[0]}-{c[3]}clients-{json.dumps(c[1], sort_keys=True)}" for c in CASES])
def test_equal_to_flower_over_several_rounds(flower_python, tmp_path, rule, ours, theirs, clients, outliers):
    initial = _initial(clients)
    rounds = [_updates(100 * r + clients, clients, outliers) for r in range(ROUNDS)]
    expected = _flower(flower_python, tmp_path, initial, rounds, "krum" if rule == "multikrum" else rule, theirs)
    strategy = build_strategy(StrategyConfig(name=rule, params=ours))
    current, state = initial, {}
    for r, updates in enumerate(rounds):
        aggregate = strategy.aggregate(current, iter(updates), state)
        current, state = aggregate.tensors, aggregate.state
        for name, value in expected[r].items():
            np.testing.assert_allclose(current[name].double().numpy(), value, rtol=1e-6,
                                       atol=1e-6 * np.abs(value).max(), err_msg=f"round {r + 1}, {name}")


def test_fedadam_without_bias_correction_is_the_papers_rule():
    """Reddi et al.'s Algorithm 2: x + η·m/(√v + τ) with no bias correction (Flower adds one)."""
    initial, updates = _initial(0), _updates(1, 4)
    result = build_strategy(StrategyConfig(name="fedadam", params={"eta": 0.1, "bias_correction": False,
                                                                   "tau": 1e-3})).aggregate(initial, iter(updates), {})
    total = sum(u.meta.samples for u in updates)
    for name in initial:
        mean = sum(u.meta.samples * u.tensors[name].double() for u in updates) / total
        m, v = 0.1 * mean, 0.01 * mean * mean
        expected = initial[name].double() + 0.1 * m / (v.sqrt() + 1e-3)
        torch.testing.assert_close(result.tensors[name].double(), expected, rtol=1e-5, atol=1e-6)


def test_robust_rules_ignore_the_outliers_fedavg_follows():
    global_tensors, updates = _initial(0), _updates(0, clients=9, outliers=2)
    honest = torch.cat([torch.cat([u.tensors[n].flatten() for n in sorted(global_tensors)]) for u in updates[2:]])
    bound = honest.abs().max()
    for rule, params in (("fedmedian", {}), ("fedtrimmedavg", {"beta": 0.25}), ("krum", {"num_malicious": 2}),
                         ("multikrum", {"num_malicious": 2})):
        result = build_strategy(StrategyConfig(name=rule, params=params)).aggregate(global_tensors, iter(updates), {})
        moved = torch.cat([(result.tensors[n] - global_tensors[n]).flatten() for n in sorted(global_tensors)])
        assert moved.abs().max() <= bound, rule
        if rule.endswith("krum"):
            assert not {"c0", "c1"} & set(result.clients), rule  # the attackers are not among the chosen
    fedavg = build_strategy(StrategyConfig(name="fedavg")).aggregate(global_tensors, iter(updates), {})
    moved = torch.cat([(fedavg.tensors[n] - global_tensors[n]).flatten() for n in sorted(global_tensors)])
    assert moved.abs().max() > bound
