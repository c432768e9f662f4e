"""Differential tests: FedFM's aggregation rules against Flower's own code on the same inputs.

Flower aggregates client *weights*; FedFM aggregates *updates* (weights − global). The rules tested
here commute with that shift, so Flower gets ``global + update`` and both must give the same new
global weights, within 1e-6 relative. Flower runs in its own venv (scripts/testenv/flwr-venv.sh: its
pins conflict with FedFM's stack), fed through files.
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


@pytest.fixture(scope="session")
def flower_python() -> str:
    return subprocess.run([str(ROOT / "scripts" / "testenv" / "flwr-venv.sh")], capture_output=True, text=True,
                          check=True).stdout.strip()


def _round(seed: int, clients: int, outliers: int = 0):
    """A global adapter and ``clients`` float32 updates; the first ``outliers`` are far off (attackers)."""
    generator = torch.Generator().manual_seed(seed)
    shapes = {"lora_A": (4, 16), "lora_B": (16, 4), "head": (3,)}
    global_tensors = {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}
    updates = []
    for index in range(clients):
        scale = 50.0 if index < outliers else 0.1
        tensors = {name: scale * torch.randn(shape, generator=generator) for name, shape in shapes.items()}
        samples = int(torch.randint(10, 200, (1,), generator=generator))
        updates.append(Adapter(tensors, AdapterMeta(kind="update", base_model="m", peft_config={}, round=1,
                                                    samples=samples, client=f"c{index}")))
    return global_tensors, updates


def _flower(python: str, tmp_path: Path, global_tensors, updates, rule: str, params: dict) -> dict:
    names = sorted(global_tensors)
    arrays = {"n": len(updates), "k": len(names), "examples": np.array([u.meta.samples for u in updates])}
    for i, update in enumerate(updates):
        for j, name in enumerate(names):
            arrays[f"w{i}_{j}"] = global_tensors[name].double().numpy() + update.tensors[name].double().numpy()
    np.savez(tmp_path / "in.npz", **arrays)
    subprocess.run([python, str(TESTS / "flower_reference.py"), str(tmp_path / "in.npz"), str(tmp_path / "out.npz"),
                    rule, json.dumps(params)], check=True, capture_output=True, text=True)
    result = np.load(tmp_path / "out.npz")
    return {name: result[f"r{j}"] for j, name in enumerate(names)}


CASES = [
    ("fedavg", {}, {}, 7, 0),
    ("fedmedian", {}, {}, 7, 2),
    ("fedmedian", {}, {}, 8, 2),  # even: the mean of the two middle values
    ("fedtrimmedavg", {"beta": 0.2}, {"beta": 0.2}, 10, 2),
    ("fedtrimmedavg", {"beta": 0.0}, {"beta": 0.0}, 5, 0),
    ("krum", {"num_malicious": 2}, {"num_malicious": 2}, 9, 2),
    ("krum", {"num_malicious": 1, "to_keep": 3}, {"num_malicious": 1, "to_keep": 3}, 9, 1),
    ("multikrum", {"num_malicious": 2}, {"num_malicious": 2, "to_keep": 7}, 9, 2),
]


@pytest.mark.parametrize("rule, ours, theirs, clients, outliers", CASES,
                         ids=[f"{c[0]}-{c[3]}clients-{json.dumps(c[1], sort_keys=True)}" for c in CASES])
def test_equal_to_flower_over_several_rounds(flower_python, tmp_path, rule, ours, theirs, clients, outliers):
    strategy = build_strategy(StrategyConfig(name=rule, params=ours))
    reference = "krum" if rule == "multikrum" else rule
    mine = None
    for round_index in range(3):  # the new global of one round is the next round's start
        global_tensors, updates = _round(100 * round_index + clients, clients, outliers)
        global_tensors = mine if mine is not None else global_tensors
        expected = _flower(flower_python, tmp_path, global_tensors, updates, reference, theirs)
        mine = strategy.aggregate(global_tensors, iter(updates), state={}).tensors
        for name, value in expected.items():
            np.testing.assert_allclose(mine[name].double().numpy(), value, rtol=1e-6, atol=1e-6 * np.abs(value).max())


def test_robust_rules_ignore_the_outliers_fedavg_follows():
    global_tensors, updates = _round(0, clients=9, outliers=2)
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
