"""Rank-aware LoRA rules on a tiny model: clients of ranks 2, 4 and 8 train side by side, each update
has its client's shapes, and the global model learns over rounds (a causal LM: LoRA is all it trains)."""

from __future__ import annotations

import pytest

from fedfm import lora
from fedfm.adapters import load_adapter
from fedfm.evaluation import evaluate_clients, summarize
from fedfm.federation import aggregate_round, export, initialize
from fedfm.training import train_client

pytestmark = pytest.mark.slow
RANKS = {"small": 2, "mid": 4, "big": 8}


def _rounds(cfg, tmp_path, rounds: int):
    """The federation's rounds in this process; the global evaluation loss before and after each round."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    current = str(tmp_path / "global-0")
    initialize(cfg, current)
    losses, state, updates = [], None, {}
    evaluation = summarize(cfg.task, evaluate_clients(cfg, current, cfg.client_names))
    losses.append(evaluation["global"]["loss"])
    for round_index in range(1, rounds + 1):
        pairs = []
        for client in cfg.sampled_clients(round_index):
            path = str(tmp_path / f"update-{round_index}-{client}")
            train_client(cfg, client, round_index, current, path)
            pairs.append((client, path))
            updates[client] = load_adapter(path)
        following, state_out = str(tmp_path / f"global-{round_index}"), str(tmp_path / f"state-{round_index}")
        aggregate_round(cfg, round_index, current, pairs, following, state_in=state, state_out=state_out)
        current, state = following, state_out
        evaluation = summarize(cfg.task, evaluate_clients(cfg, current, cfg.client_names))
        losses.append(evaluation["global"]["loss"])
    _rounds.last_evaluation = evaluation  # each tenant's figures after the last round
    return current, losses, updates


@pytest.mark.parametrize("strategy", ["hetlora", "flexlora", "flora"])
def test_mixed_ranks_train_side_by_side_and_the_global_model_learns(strategy, tiny_config, tmp_path):
    cfg = tiny_config("causal-lm", **{"clients": [{"name": name, "lora_r": rank} for name, rank in RANKS.items()],
                         "strategy.name": strategy, "training.local_steps": 8, "training.learning_rate": 1e-2})
    final, losses, updates = _rounds(cfg, tmp_path, rounds=3)
    start = load_adapter(tmp_path / "global-0").tensors
    assert lora.rank_of(start) == cfg.global_rank == 8
    for client, update in updates.items():
        assert lora.rank_of(update.tensors) == RANKS[client]
        for name, value in update.tensors.items():
            assert tuple(value.shape) == lora.shape_at(name, tuple(start[name].shape), RANKS[client])
    # FLoRA stacks every round's clients onto the global adapter (the zero initial one is dropped)
    final_rank = 3 * sum(RANKS.values()) if strategy == "flora" else 8
    assert {name: tuple(value.shape) for name, value in load_adapter(final).tensors.items()} == {
        name: lora.shape_at(name, tuple(value.shape), final_rank) for name, value in start.items()}
    assert losses[-1] < losses[0] - 0.05, losses

    from peft import PeftConfig
    export(cfg, final, str(tmp_path / "adapter"))
    exported = PeftConfig.from_pretrained(str(tmp_path / "adapter"))
    assert exported.r == final_rank and exported.lora_alpha == pytest.approx(cfg.lora.scaling * final_rank)


def test_ffalora_trains_and_sends_only_b(tiny_config, tmp_path):
    cfg = tiny_config("causal-lm", **{"strategy.name": "ffalora", "training.local_steps": 8,
                                      "training.learning_rate": 1e-2})
    final, losses, updates = _rounds(cfg, tmp_path, rounds=2)
    start, end = load_adapter(tmp_path / "global-0").tensors, load_adapter(final).tensors
    assert all(not any(lora.is_lora_a(name) for name in update.tensors) for update in updates.values())
    assert any(lora.is_lora_b(name) for name in next(iter(updates.values())).tensors)
    for name in start:
        if lora.is_lora_a(name):
            assert (end[name] == start[name]).all(), name  # A never moves
    assert losses[-1] < losses[0] - 0.05, losses


def test_fedsalora_personalized_models_beat_the_shared_one_on_each_tenants_skewed_data(tmp_path):
    """Each tenant holds one topic (partition by label; all-MiniLM-L6-v2, the real pretrained model).
    FedSA-LoRA shares A and keeps each tenant's B; scored with its own B, every tenant does better on
    its own data than the FedAvg model trained with the same budget, and no B ever leaves a client."""
    from fedfm.config import FederationConfig
    from fedfm.data import resolve_labels

    def config(strategy: str):
        return resolve_labels(FederationConfig.parse({
            "data": {"partition": "column:label", "max_samples": 400}, "clients": 4, "model": {"max_length": 32},
            "strategy": {"name": strategy}, "execution": {"client_state_uri": str(tmp_path / "client-state")},
            "training": {"local_steps": 8, "batch_size": 16, "learning_rate": 2e-3}}))

    _rounds(config("fedavg"), tmp_path / "fedavg", rounds=2)
    shared = _rounds.last_evaluation["clients"]
    cfg = config("fedsalora")
    final, losses, updates = _rounds(cfg, tmp_path / "fedsa", rounds=2)
    personalized = _rounds.last_evaluation["clients"]
    for client in cfg.client_names:
        # the shared model starts from the tenants' class means (head.init prototypes) and is good already;
        # each tenant's own B still cuts its loss tenfold
        assert personalized[client]["loss"] < shared[client]["loss"] / 10, (client, personalized, shared)
        assert not any(lora.is_lora_b(name) for name in updates[client].tensors)  # B stays home
        kept = sorted((tmp_path / "client-state" / client).iterdir())
        assert [path.name for path in kept] == ["round-0001.safetensors", "round-0002.safetensors"]
    start, end = load_adapter(tmp_path / "fedsa" / "global-0").tensors, load_adapter(final).tensors
    assert all((end[n] == start[n]).all() for n in start if lora.is_lora_b(n))  # the global B never moves
    assert any((end[n] != start[n]).any() for n in start if lora.is_lora_a(n))  # A is learned together


def test_fedsalora_needs_somewhere_to_keep_b(tiny_config):
    from fedfm.errors import ConfigError
    from fedfm.strategies import check_federation

    with pytest.raises(ConfigError, match=r"client tenant-0 has nowhere to keep its lora_B \(strategy "
                                          r"'fedsalora'\): set its state_uri or execution.client_state_uri"):
        check_federation(tiny_config("causal-lm", **{"strategy.name": "fedsalora"}))
