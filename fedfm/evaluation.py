"""Evaluate an adapter on every tenant's held-out data, per client and globally.

Classification reports loss and accuracy; causal-LM reports loss and perplexity over response tokens.
The global figures add up the per-client counts (the same as evaluating on the union of the tenants'
evaluation sets), so they never average averages.
"""

from __future__ import annotations

from typing import Any

import torch

from fedfm.adapters import load_adapter
from fedfm.config import FederationConfig
from fedfm.tasks import LossSums, batch_sums, collate, encode

_EVAL_BATCH = 32


def evaluate_adapter(cfg: FederationConfig, adapter_uri: str) -> dict[str, Any]:
    """``{"global": metrics, "clients": {name: metrics}}`` for the adapter at ``adapter_uri``."""
    from fedfm.data import load_eval_sets
    from fedfm.modeling import build_model, load_adapter_tensors

    adapter = load_adapter(adapter_uri, who="the federation")
    loaded = build_model(cfg)
    load_adapter_tensors(loaded.model, adapter.tensors, where=f"adapter {adapter_uri}")
    model = loaded.model.eval()

    total = LossSums()
    per_client: dict[str, dict[str, Any]] = {}
    for client, frame in load_eval_sets(cfg).items():
        sums = _evaluate_frame(model, loaded.tokenizer, frame, cfg)
        per_client[client] = sums.metrics(cfg.task)
        total.add(sums)
    return {"global": total.metrics(cfg.task), "clients": per_client}


@torch.no_grad()
def _evaluate_frame(model, tokenizer, frame, cfg: FederationConfig) -> LossSums:
    examples = encode(frame, tokenizer, cfg)
    # Similar lengths together: less padding, same sums.
    examples.sort(key=lambda example: len(example["input_ids"]))
    sums = LossSums()
    for start in range(0, len(examples), _EVAL_BATCH):
        batch = collate(examples[start : start + _EVAL_BATCH], tokenizer.pad_token_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        sums.add(batch_sums(logits, batch["labels"], cfg.task))
    return sums
