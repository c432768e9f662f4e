"""Local fine-tuning through DeepSpeed on CPU: it learns, at each ZeRO stage, in one or two processes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedfm.adapters import load_adapter
from fedfm.errors import TrainingError
from fedfm.federation import initialize
from fedfm.training import train_client

pytestmark = pytest.mark.slow


def _train(cfg, tmp_path, client="tenant-0", tag="run", **options):
    global_path = tmp_path / "global.safetensors"
    if not global_path.exists():
        initialize(cfg, str(global_path))
    update_path = tmp_path / f"{tag}-{client}.safetensors"
    result = train_client(cfg, client, 1, str(global_path), str(update_path), **options)
    return result, load_adapter(update_path), load_adapter(global_path)


def _falls(losses: list[float]) -> bool:
    head, tail = np.mean(losses[:3]), np.mean(losses[-3:])
    return tail < head - 0.05


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_a_pretrained_encoder_learns_at_zero_stage(zero_stage, tmp_path):
    """all-MiniLM-L6-v2 (the real pretrained model) + LoRA on the built-in topics data."""
    from fedfm.config import FederationConfig
    from fedfm.data import resolve_labels

    cfg = resolve_labels(FederationConfig.parse({
        "data": {"partition": "iid", "max_samples": 600}, "clients": 2,
        "model": {"max_length": 48},
        "training": {"local_steps": 15, "batch_size": 16, "learning_rate": 2e-3, "zero_stage": zero_stage},
    }))
    result, update, start = _train(cfg, tmp_path)
    assert len(result.loss_history) == 15 and all(math.isfinite(x) for x in result.loss_history)
    assert _falls(result.loss_history), result.loss_history
    assert update.meta.kind == "update" and update.meta.client == "tenant-0" and update.meta.round == 1
    assert update.meta.samples == result.samples == 240  # 600 rows / 2 clients, 80 % train
    assert update.meta.metrics["zero_stage"] == zero_stage and update.meta.metrics["steps"] == 15
    assert update.meta.base_model == start.meta.base_model
    assert set(update.tensors) == set(start.tensors)
    moved = {name for name, delta in update.tensors.items() if delta.abs().max() > 0}
    assert any("lora_B" in name for name in moved) and any("classifier" in name for name in moved)
    assert result.update_norm > 0 and result.bytes_down == (tmp_path / "global.safetensors").stat().st_size


def test_causal_lm_learns_the_responses_in_bf16_at_zero_3(tiny_config, tmp_path):
    cfg = tiny_config("causal-lm", **{"training.local_steps": 12, "training.zero_stage": 3, "training.bf16": True})
    result, update, _ = _train(cfg, tmp_path)
    assert _falls(result.loss_history), result.loss_history
    assert all(torch.isfinite(delta).all() for delta in update.tensors.values())


def test_bf16_updates_come_from_the_fp32_master_weights(tiny_config, tmp_path):
    """With bf16 the module holds rounded copies; the update must carry the optimizer's fp32 weights."""
    cfg = tiny_config(**{"training.local_steps": 5, "training.bf16": True, "training.zero_stage": 0})
    _, update, start = _train(cfg, tmp_path)
    trained = {name: start.tensors[name] + update.tensors[name] for name in start.tensors}
    lora_b = [value for name, value in trained.items() if "lora_B" in name]
    assert all(value.abs().max() > 0 for value in lora_b)
    # fp32 values that bf16 cannot represent exist only if the masters were read, not the bf16 copies
    assert any(not torch.equal(value, value.to(torch.bfloat16).float()) for value in lora_b)


def test_two_processes_train_like_one(tiny_config, tmp_path):
    """Data parallel with 2 DeepSpeed ranks (torchrun, gloo) sees the same batches per optimizer step
    as 1 rank, so the loss curve and the update agree up to floating-point reduction order."""
    cfg = tiny_config("causal-lm", **{"training.local_steps": 6, "training.zero_stage": 2})
    one, update_one, _ = _train(cfg, tmp_path, tag="one")
    two, update_two, _ = _train(cfg.with_overrides({"training.world_size": 2}), tmp_path, tag="two")
    assert update_two.meta.metrics["world_size"] == 2
    assert _falls(two.loss_history)
    assert np.allclose(one.loss_history, two.loss_history, rtol=1e-4, atol=1e-4)
    for name, delta in update_one.tensors.items():
        assert torch.allclose(delta, update_two.tensors[name], atol=1e-5), name


def test_a_failing_rank_reports_the_reason(tiny_config, tmp_path):
    cfg = tiny_config(**{"training.world_size": 2})
    initialize(cfg, str(tmp_path / "global.safetensors"))
    with pytest.raises(TrainingError, match=r"client nobody: 2 DeepSpeed processes exited with status 1: "
                                            r"client 'nobody' is not in this federation \(clients: tenant-0, "
                                            r"tenant-1, tenant-2\)$"):
        train_client(cfg, "nobody", 1, str(tmp_path / "global.safetensors"), str(tmp_path / "u.safetensors"))
    assert not (tmp_path / "u.safetensors").exists()


def test_a_client_with_another_base_model_refuses_to_train(tiny_config, tiny_causal_lm, tmp_path):
    cfg = tiny_config()
    initialize(cfg, str(tmp_path / "global.safetensors"))
    other = cfg.with_overrides({"seed": 5})  # same model: fine
    train_client(other, "tenant-1", 1, str(tmp_path / "global.safetensors"), str(tmp_path / "ok.safetensors"))
    from transformers import BertConfig, BertModel
    from fedfm.modeling import load_tokenizer

    tokenizer = load_tokenizer(cfg)
    tokenizer.save_pretrained(tmp_path / "other-bert")
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(tmp_path / "other-bert")
    stranger = cfg.with_overrides({"model.name_or_path": str(tmp_path / "other-bert")})
    with pytest.raises(TrainingError, match="client tenant-1: the local base model .* is not the federation's"):
        train_client(stranger, "tenant-1", 1, str(tmp_path / "global.safetensors"), str(tmp_path / "u.safetensors"))
    assert not (tmp_path / "u.safetensors").exists()


def test_local_epochs_set_the_number_of_steps(tiny_config, tmp_path):
    cfg = tiny_config(**{"training.local_epochs": 0.5, "training.batch_size": 8})
    result, update, _ = _train(cfg, tmp_path)
    assert result.steps == math.ceil(0.5 * result.samples / 8)
    assert update.meta.metrics["steps"] == result.steps


def test_in_process_training_leaves_no_launcher_environment(tiny_config, tmp_path):
    """Processes started after an in-process client must not believe they are ranks of a launcher."""
    import os

    launcher_variables = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    before = {name: os.environ.get(name) for name in launcher_variables}
    _train(tiny_config(), tmp_path, client="tenant-0", tag="first")
    _train(tiny_config(), tmp_path, client="tenant-1", tag="second")  # the process group is reused
    assert {name: os.environ.get(name) for name in launcher_variables} == before


def test_fedprox_keeps_the_client_near_the_global_adapter(tiny_config, tmp_path):
    """The fedprox strategy's configure hook turns the proximal term on: the same client, data and seed
    move less from the global adapter the larger μ is, and μ = 1e-9 changes nothing measurable."""
    norms = {}
    for mu in (None, 1e-9, 1.0, 20.0):
        overrides = {"training.local_steps": 10, "training.learning_rate": 2e-2}
        if mu is not None:
            overrides.update({"strategy.name": "fedprox", "strategy.params": {"mu": mu}})
        result, update, _ = _train(tiny_config(**overrides), tmp_path, tag=f"mu-{mu}")
        norms[mu] = result.update_norm
        assert all(math.isfinite(x) for x in result.loss_history)
    assert norms[1e-9] == pytest.approx(norms[None], rel=1e-4)
    assert norms[20.0] < norms[1.0] < norms[None]


def test_fedprox_refuses_zero_3(tiny_config):
    from fedfm.errors import ConfigError

    with pytest.raises(ConfigError, match="strategy fedprox needs training.zero_stage 0-2"):
        tiny_config(**{"strategy.name": "fedprox", "training.zero_stage": 3})


def test_a_poison_data_hook_replaces_the_training_frame(tiny_config, tmp_path, monkeypatch):
    """A simulated label-flip attacker: the hook sees the client's own train frame, and what it returns
    (here: the first 20 rows, labels flipped) is what the client encodes and trains on."""
    import pandas as pd

    from fedfm import tasks
    from fedfm.attacks import flip_labels
    from fedfm.data import load_client_data

    cfg = tiny_config(**{"training.local_steps": 3})
    honest = load_client_data(cfg, "tenant-0").train
    seen, encoded = [], []

    def hook(frame):
        seen.append(frame.copy())
        return flip_labels(frame.head(20), "label", cfg.data.labels)

    real_encode = tasks.encode
    monkeypatch.setattr(tasks, "encode", lambda frame, *rest: encoded.append(frame.copy()) or real_encode(frame, *rest))
    result, update, _ = _train(cfg, tmp_path, poison_data=hook)
    assert len(seen) == 1
    pd.testing.assert_frame_equal(seen[0], honest)
    assert result.samples == update.meta.samples == 20
    k = len(cfg.data.labels)
    # the training frame, then the empty text that round 1's head prototypes are taken relative to
    assert k == 4 and len(encoded) == 2 and encoded[1]["text"].tolist() == [""]
    assert encoded[0]["label"].tolist() == [k - 1 - label for label in honest["label"].head(20)]
    assert encoded[0]["text"].tolist() == honest["text"].head(20).tolist()
    assert all(torch.isfinite(delta).all() for delta in update.tensors.values()) and result.update_norm > 0


def test_a_poison_data_hook_needs_one_process(tiny_config, tmp_path):
    cfg = tiny_config(**{"training.world_size": 2})
    with pytest.raises(TrainingError, match="client tenant-0: training on poisoned data .* needs "
                                            "training.world_size 1, not 2"):
        train_client(cfg, "tenant-0", 1, str(tmp_path / "global.safetensors"), str(tmp_path / "u.safetensors"),
                     poison_data=lambda frame: frame)
    assert not (tmp_path / "u.safetensors").exists()


def test_round_one_starts_the_head_from_the_class_means_of_the_pooler_features(tmp_path):
    """BERT's head reads the pooler output; in round 1 a client's update moves the rows of the classes it holds
    to the nearest-mean classifier of its own examples there, relative to the empty text's features (one step
    at a negligible learning rate after it),
    sends its class counts, and leaves the rows of classes it lacks where they were."""
    from fedfm.data import load_client_data
    from fedfm.head import COUNTS_KEY, class_row_tensors
    from fedfm.modeling import build_model
    from fedfm.tasks import collate, encode

    from fedfm.config import FederationConfig
    from fedfm.data import resolve_labels

    cfg = resolve_labels(FederationConfig.parse({  # all-MiniLM-L6-v2: a pretrained model's features
        "data": {"partition": "dirichlet:0.1", "max_samples": 300}, "clients": 3, "model": {"max_length": 48},
        "training": {"local_steps": 1, "batch_size": 8, "learning_rate": 1e-12}}))
    result, update, start = _train(cfg, tmp_path)
    labels = len(cfg.data.labels)
    weight, bias = sorted(class_row_tensors(start.tensors, labels), key=lambda name: start.tensors[name].dim())[::-1]

    loaded = build_model(cfg)
    loaded.model.eval()
    examples = encode(load_client_data(cfg, "tenant-0").train, loaded.tokenizer, cfg)
    batch = collate(examples, loaded.tokenizer.pad_token_id)
    empty = loaded.tokenizer([""], return_tensors="pt")  # the reference input: the empty text
    with torch.no_grad():
        bert = loaded.model.base_model.model.bert
        origin = bert(input_ids=empty["input_ids"], attention_mask=empty["attention_mask"]).pooler_output.double()
        features = bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).pooler_output.double()
    counts = torch.bincount(batch["labels"], minlength=labels)
    held = counts > 0
    assert update.meta.metrics[COUNTS_KEY] == counts.tolist() and 0 < int(held.sum()) < labels
    means = torch.stack([features[batch["labels"] == c].mean(0) for c in range(labels) if held[c]])
    within = float((features - torch.zeros_like(features).index_copy_(
        0, torch.arange(len(features)), means[torch.cumsum(held, 0)[batch["labels"]] - 1])).pow(2).mean())
    tau = 1 / (within * math.sqrt(features.shape[1]))
    rows = start.tensors[weight] + update.tensors[weight]
    assert torch.allclose(rows[held].double(), tau * (means - origin), rtol=1e-4, atol=1e-4)
    assert torch.allclose((start.tensors[bias] + update.tensors[bias])[held].double(),
                          0.5 * tau * (origin.pow(2).sum() - means.pow(2).sum(1)), rtol=1e-4, atol=1e-3)
    assert torch.allclose(update.tensors[weight][~held], torch.zeros(1), atol=1e-6)  # lacked rows: one tiny step
