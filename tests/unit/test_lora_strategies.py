"""LoRA-aware aggregation (HetLoRA, FlexLoRA, FFA-LoRA): shapes at mixed ranks, and the plain rules
they reduce to where their papers say so."""

from __future__ import annotations

import pytest
import torch

from fedfm import lora
from fedfm.adapters import Adapter, AdapterMeta, save_adapter
from fedfm.config import FederationConfig, StrategyConfig
from fedfm.errors import AdapterValidationError, ConfigError
from fedfm.federation import aggregate_round
from fedfm.strategies import build_strategy, check_federation

A1, B1, A2, B2, HEAD = ("q.lora_A.weight", "q.lora_B.weight", "v.lora_A.weight", "v.lora_B.weight", "head.weight")
OUT, IN, RANK = 6, 5, 4


def global_adapter(seed: int = 0, b_zero: bool = False):
    generator = torch.Generator().manual_seed(seed)
    tensors = {A1: torch.randn(RANK, IN, generator=generator), B1: torch.randn(OUT, RANK, generator=generator),
               A2: torch.randn(RANK, IN, generator=generator), B2: torch.randn(OUT, RANK, generator=generator),
               HEAD: torch.randn(3, OUT, generator=generator)}
    if b_zero:
        tensors[B1].zero_()
        tensors[B2].zero_()
    return tensors


def client_update(seed: int, rank: int, samples: int, client: str, *, send_a: bool = True) -> Adapter:
    generator = torch.Generator().manual_seed(seed)
    shapes = {name: lora.shape_at(name, tuple(value.shape), rank) for name, value in global_adapter().items()}
    tensors = {name: 0.3 * torch.randn(shape, generator=generator) for name, shape in shapes.items()
               if send_a or not lora.is_lora_a(name)}
    return Adapter(tensors, AdapterMeta(kind="update", base_model="m", peft_config={}, round=1, samples=samples,
                                        client=client))


def local_factors(global_tensors, update: Adapter):
    local = lora.truncate(global_tensors, lora.rank_of(update.tensors) or RANK)
    for name, delta in update.tensors.items():
        local[name] = local[name] + delta
    return local


def test_truncation_and_shapes():
    tensors = global_adapter()
    two = lora.truncate(tensors, 2)
    assert two[A1].shape == (2, IN) and two[B1].shape == (OUT, 2) and two[HEAD].shape == (3, OUT)
    torch.testing.assert_close(two[A1], tensors[A1][:2])
    torch.testing.assert_close(two[B1], tensors[B1][:, :2])
    assert lora.rank_of(two) == 2 and lora.layers(tensors) == {"q": (A1, B1), "v": (A2, B2)}


def test_hetlora_at_one_rank_without_sparsity_weights_is_fedavg():
    start = global_adapter()
    updates = [client_update(i, RANK, 10 * (i + 1), f"c{i}") for i in range(3)]
    het = build_strategy(StrategyConfig(name="hetlora", params={"sparsity_weighted": False}))
    result = het.aggregate(start, iter(updates), {})
    fedavg = build_strategy(StrategyConfig(name="fedavg")).aggregate(start, iter(updates), {})
    for name in start:
        torch.testing.assert_close(result.tensors[name], fedavg.tensors[name])


def test_hetlora_zero_pads_lower_ranks_and_weights_by_the_product_norm():
    start = global_adapter()
    updates = [client_update(1, 1, 10, "small"), client_update(2, 2, 20, "mid"), client_update(3, RANK, 30, "big")]
    result = build_strategy(StrategyConfig(name="hetlora")).aggregate(start, iter(updates), {})
    locals_ = [local_factors(start, update) for update in updates]
    norms = [sum(float(torch.linalg.matrix_norm(local[b] @ local[a]) ** 2) for a, b in ((A1, B1), (A2, B2))) ** 0.5
             for local in locals_]
    total = sum(norms)
    for name in (A1, B1):
        expected = torch.zeros_like(start[name])
        for weight, local in zip(norms, locals_):
            lora.pad_into(expected, local[name]).add_(local[name] * weight / total)
        assert result.tensors[name].shape == start[name].shape
        torch.testing.assert_close(result.tensors[name], expected)
    # component 3 of A (beyond the small and mid clients' ranks) comes from the big client alone, shrunk
    torch.testing.assert_close(result.tensors[A1][3], locals_[2][A1][3] * norms[2] / total)
    samples = [10, 20, 30]  # the head is sample-weighted
    torch.testing.assert_close(result.tensors[HEAD],
                               sum(s * local[HEAD] for s, local in zip(samples, locals_)) / sum(samples))


def test_flexlora_averages_the_products_and_redistributes_by_svd():
    start = global_adapter(b_zero=True)
    # one client: the global product is exactly its local product
    only = client_update(5, 2, 10, "only")
    result = build_strategy(StrategyConfig(name="flexlora")).aggregate(start, iter([only]), {})
    local = local_factors(start, only)
    for a, b in ((A1, B1), (A2, B2)):
        torch.testing.assert_close(result.tensors[b] @ result.tensors[a], local[b] @ local[a], atol=1e-5, rtol=1e-5)
        assert result.tensors[a].shape == (RANK, IN) and result.tensors[b].shape == (OUT, RANK)

    # two rank-2 clients under a rank-4 global: the mean of products has rank ≤ 4, so it is exact;
    # a rank-1 client's view of the result is the mean's best rank-1 approximation
    updates = [client_update(6, 2, 10, "x"), client_update(7, 2, 30, "y")]
    result = build_strategy(StrategyConfig(name="flexlora")).aggregate(start, iter(updates), {})
    mean = sum(u.meta.samples * (loc[B1] @ loc[A1]) for u, loc in ((u, local_factors(start, u)) for u in updates)) / 40
    torch.testing.assert_close(result.tensors[B1] @ result.tensors[A1], mean, atol=1e-5, rtol=1e-5)
    one = lora.truncate(result.tensors, 1)
    u, s, vh = torch.linalg.svd(mean)
    torch.testing.assert_close(one[B1] @ one[A1], s[0] * torch.outer(u[:, 0], vh[0]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(result.tensors[HEAD], start[HEAD] + sum(
        u.meta.samples * u.tensors[HEAD] for u in updates) / 40)


def test_ffalora_keeps_a_and_its_average_is_exact():
    start = global_adapter()
    updates = [client_update(i, RANK, 10 * (i + 1), f"c{i}", send_a=False) for i in range(3)]
    strategy = build_strategy(StrategyConfig(name="ffalora"))
    assert strategy.configure(1, "c0") == {"lora.freeze_a": True}
    result = strategy.aggregate(start, iter(updates), {})
    torch.testing.assert_close(result.tensors[A1], start[A1])
    mean = sum(u.meta.samples * (local_factors(start, u)[B1] @ start[A1]) for u in updates) / 60
    torch.testing.assert_close(result.tensors[B1] @ result.tensors[A1], mean)


def test_mixed_ranks_need_a_rank_aware_strategy(tmp_path):
    from fedfm.pipelines.federated_finetune import compile_pipeline

    clients = [{"name": "small", "lora_r": 2}, {"name": "big", "lora_r": 8}]
    cfg = FederationConfig.parse({"clients": clients, "lora": {"r": 4, "alpha": 8}})
    assert (cfg.global_rank, cfg.client_rank("small"), cfg.client_rank("big")) == (8, 2, 8)
    with pytest.raises(ConfigError, match=r"clients train different LoRA ranks \(small: 2, big: 8\); strategy "
                                          r"'fedavg' needs one rank; choose a rank-aware strategy "
                                          r"\(flexlora, flora, hetlora\)"):
        check_federation(cfg)
    with pytest.raises(ConfigError, match="clients train different LoRA ranks"):
        compile_pipeline(cfg, str(tmp_path / "p.yaml"))  # refused before anything is written
    assert not (tmp_path / "p.yaml").exists()
    check_federation(cfg.with_overrides({"strategy.name": "flexlora"}))


@pytest.mark.parametrize("strategy, defect, message", [
    ("hetlora", "rank", r"client small's tensor q.lora_A.weight has shape \(4, 5\); this client's should be \(2, 5\)"),
    ("ffalora", "sends A", r"client small's update has tensor q.lora_A.weight, which it should not send "
                           r"\(this client trains it frozen\)"),
])
def test_the_aggregate_step_checks_each_clients_rank_and_frozen_factors(tmp_path, strategy, defect, message):
    clients = [{"name": "small", "lora_r": 2 if strategy == "hetlora" else RANK}, {"name": "big", "lora_r": RANK}]
    cfg = FederationConfig.parse({"clients": clients, "strategy": {"name": strategy}})
    save_adapter(tmp_path / "g", global_adapter(), AdapterMeta(kind="global", base_model="m", peft_config={}, round=0))
    bad = client_update(1, RANK, 10, "small", send_a=True)
    good = client_update(2, RANK, 10, "big", send_a=strategy != "ffalora")
    for update in (bad, good):
        save_adapter(tmp_path / update.meta.client, update.tensors, update.meta)
    with pytest.raises(AdapterValidationError, match=message):
        aggregate_round(cfg, 1, str(tmp_path / "g"), [(c, str(tmp_path / c)) for c in ("small", "big")],
                        str(tmp_path / "next"))
    assert not (tmp_path / "next").exists()


def test_flora_stacks_so_the_product_grows_by_exactly_the_weighted_sum():
    start = global_adapter()
    start[B1][:, 1].zero_()
    start[B2][:, 1].zero_()  # component 1 contributes nothing in any layer: it is dropped
    updates = [client_update(8, 1, 10, "small"), client_update(9, 3, 30, "big")]
    strategy = build_strategy(StrategyConfig(name="flora"))
    assert strategy.configure(2, "small") == {"lora.restart": True}
    result = strategy.aggregate(start, iter(updates), {})
    assert lora.rank_of(result.tensors) == RANK - 1 + 1 + 3
    for a, b in ((A1, B1), (A2, B2)):
        assert result.tensors[a].shape == (RANK + 3, IN) and result.tensors[b].shape == (OUT, RANK + 3)
        grown = start[b] @ start[a] + sum(u.meta.samples / 40 * (u.tensors[b] @ u.tensors[a]) for u in updates)
        torch.testing.assert_close(result.tensors[b] @ result.tensors[a], grown)
    torch.testing.assert_close(result.tensors[HEAD], start[HEAD] + sum(
        u.meta.samples * u.tensors[HEAD] for u in updates) / 40)
