"""Models: where they load from, their fingerprint, LoRA state in and out, PEFT export; task encoding."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from fedfm.adapters import load_adapter
from fedfm.errors import AdapterError, ModelError
from fedfm.federation import export, initialize
from fedfm.modeling import (adapter_tensors, build_model, load_adapter_tensors, load_tokenizer,
                            resolve_model_source)
from fedfm.tasks import IGNORE_INDEX, batch_sums, collate, encode


def test_the_default_hub_id_resolves_to_the_packaged_copy():
    source = resolve_model_source("sentence-transformers/all-MiniLM-L6-v2")
    assert (Path(source) / "config.json").exists() and (Path(source) / "model.safetensors").exists()
    assert resolve_model_source("some-org/some-model") == "some-org/some-model"  # a hub id stays a hub id


def test_fingerprint_identifies_the_pretrained_weights_only(tiny_config, tiny_classifier, tmp_path):
    cfg = tiny_config()
    first = build_model(cfg).fingerprint
    assert build_model(cfg).fingerprint == first
    # a different seed initializes the new classification head differently: same base model
    assert build_model(cfg.with_overrides({"seed": 99})).fingerprint == first
    # the same checkpoint copied elsewhere is the same base model
    import shutil
    shutil.copytree(tiny_classifier, tmp_path / "copy")
    assert build_model(cfg.with_overrides({"model.name_or_path": str(tmp_path / "copy")})).fingerprint == first
    # other weights are another base model
    from transformers import BertModel
    model = BertModel.from_pretrained(tiny_classifier)
    with torch.no_grad():
        model.encoder.layer[1].output.dense.weight.mul_(1.01)
    model.save_pretrained(tmp_path / "copy")
    assert build_model(cfg.with_overrides({"model.name_or_path": str(tmp_path / "copy")})).fingerprint != first


def test_adapter_state_round_trips_through_a_model(tiny_config):
    cfg = tiny_config()
    loaded = build_model(cfg)
    state = adapter_tensors(loaded.model)
    assert any("lora_A" in name for name in state) and any("classifier" in name for name in state)
    changed = {name: value + 0.25 for name, value in state.items()}
    load_adapter_tensors(loaded.model, changed, where="test")
    for name, value in adapter_tensors(loaded.model).items():
        assert torch.equal(value, changed[name])
    wrong = dict(changed)
    wrong.pop(next(iter(wrong)))
    with pytest.raises(AdapterError, match="does not fit the model built from this config: missing"):
        load_adapter_tensors(loaded.model, wrong, where="test")
    bigger = build_model(cfg.with_overrides({"lora.r": 8}))
    with pytest.raises(AdapterError, match=r"was lora.r changed\?"):
        load_adapter_tensors(bigger.model, changed, where="test")


def test_missing_models_are_named(tiny_config, tmp_path):
    cfg = tiny_config().with_overrides({"model.name_or_path": str(tmp_path / "nope")})
    with pytest.raises(ModelError, match=r"cannot load tokenizer '.*nope': no such directory"):
        build_model(cfg)


def test_export_loads_with_peft_and_predicts_like_the_federation(tiny_config, tiny_classifier, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    cfg = tiny_config()
    initialize(cfg, str(tmp_path / "global.safetensors"))
    # make the adapter non-trivial (B starts at zero) so the comparison means something
    adapter = load_adapter(tmp_path / "global.safetensors")
    generator = torch.Generator().manual_seed(0)
    tensors = {name: value + 0.05 * torch.randn(value.shape, generator=generator)
               for name, value in adapter.tensors.items()}
    from fedfm.adapters import save_adapter
    save_adapter(tmp_path / "trained.safetensors", tensors, adapter.meta)
    provenance = export(cfg, str(tmp_path / "trained.safetensors"), str(tmp_path / "export"))
    assert provenance["base_model_fingerprint"] == adapter.meta.base_model

    config = json.loads((tmp_path / "export" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == tiny_classifier and config["r"] == 4
    info = json.loads((tmp_path / "export" / "fedfm.json").read_text())
    assert info["labels"] == cfg.data.labels and info["task"] == "classification"

    tokenizer = AutoTokenizer.from_pretrained(tiny_classifier)
    batch = tokenizer(["the team won the match", "shares fell after the earnings report"], return_tensors="pt",
                      padding=True)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_classifier, num_labels=len(cfg.data.labels))
    theirs = PeftModel.from_pretrained(base, tmp_path / "export").eval()
    ours = build_model(cfg)
    load_adapter_tensors(ours.model, tensors, where="test")
    with torch.no_grad():
        assert torch.allclose(theirs(**batch).logits, ours.model.eval()(**batch).logits, atol=1e-5)


def test_causal_lm_loss_covers_the_response_only(tiny_config):
    cfg = tiny_config("causal-lm").with_overrides({"model.max_length": 12})
    tokenizer = load_tokenizer(cfg)
    frame = pd.DataFrame({"prompt": ["classify the topic of : the team won the match topic :",
                                     "topic :"], "response": [" sports", " health"]})
    examples = encode(frame, tokenizer, cfg)
    long, short = examples
    assert len(long["input_ids"]) == 12  # truncated to max_length ...
    response = tokenizer(" sports", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert long["input_ids"][-len(response):] == response  # ... from the prompt's start, never the target
    assert long["labels"] == [IGNORE_INDEX] * (12 - len(response)) + response
    assert short["labels"][: len(short["labels"]) - 2] == [IGNORE_INDEX] * (len(short["labels"]) - 2)

    batch = collate(examples, tokenizer.pad_token_id)
    assert batch["input_ids"].shape == (2, 12)
    assert (batch["labels"][1, len(short["input_ids"]):] == IGNORE_INDEX).all()  # padding is ignored
    assert batch["attention_mask"][1].sum() == len(short["input_ids"])

    # Loss counts exactly the response tokens: putting any logits on prompt positions changes nothing.
    vocabulary = len(tokenizer)
    logits = torch.zeros(2, 12, vocabulary)
    base = batch_sums(logits, batch["labels"], "causal-lm")
    assert base.count == 2 * len(response)
    logits[:, 0, :] = torch.randn(vocabulary)  # position 0 predicts a prompt token
    assert batch_sums(logits, batch["labels"], "causal-lm").loss_sum == pytest.approx(base.loss_sum)


def test_classification_sums_count_correct_predictions():
    logits = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 0.0]])
    sums = batch_sums(logits, torch.tensor([0, 1, 1]), "classification")
    assert sums.correct == 2 and sums.count == 3
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 1]), reduction="sum")
    assert sums.loss_sum == pytest.approx(float(expected))
    assert sums.metrics("classification")["accuracy"] == pytest.approx(2 / 3)
