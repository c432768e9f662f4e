"""Evaluate an adapter on tenants' held-out data, per client, and combine the counts globally.

Classification reports loss and accuracy; causal-LM reports loss and perplexity over the assistant (response) tokens;
preference reports the DPO loss, the preference accuracy (pairs whose chosen reply earns the larger implicit reward)
and the mean reward margin, against the federation's starting model (:mod:`fedfm.preference`).
Each client's result is a :class:`~fedfm.tasks.LossSums` of additive counts, so the global figures
(the same as evaluating on the union of the tenants' evaluation sets) never average averages, and a
client can evaluate where its data lives and send back only the counts.
"""

from __future__ import annotations

from typing import Any

import torch

from fedfm.adapters import load_adapter
from fedfm.config import FederationConfig, PolicyConfig
from fedfm.tasks import LossSums, batch_sums, batches, encode

_EVAL_BATCH = 32


def evaluate_clients(cfg: FederationConfig, adapter_uri: str, clients: list[str]) -> dict[str, LossSums]:
    """Each of ``clients``' evaluation split, scored with the adapter at ``adapter_uri`` (one model load)."""
    from fedfm.data import load_client_data
    from fedfm.lora import rank_of
    from fedfm.modeling import build_model, load_adapter_tensors
    from fedfm.personal import load_personal
    from fedfm.strategies import configure_client

    adapter = load_adapter(adapter_uri, who="the federation")
    loaded = build_model(cfg, rank=rank_of(adapter.tensors) or None)  # FLoRA's global rank grows each round
    load_adapter_tensors(loaded.model, adapter.tensors, where=f"adapter {adapter_uri}")
    model = loaded.model.to(_device()).eval()
    sums = {}
    for client in clients:
        # a client that keeps part of its adapter (FedSA-LoRA's B) is scored with it: the model it uses
        personal = (load_personal(cfg, client, adapter.meta.round)
                    if configure_client(cfg, client, adapter.meta.round).lora.keep_b_local else {})
        if personal:
            load_adapter_tensors(model, {**adapter.tensors, **personal}, where=f"client {client}'s adapter")
        sums[client] = _evaluate_frame(model, loaded.tokenizer, load_client_data(cfg, client).eval, cfg)
        if personal:
            load_adapter_tensors(model, adapter.tensors, where=f"adapter {adapter_uri}")
    return sums


def bounded(sums: dict[str, LossSums], policy: PolicyConfig) -> dict[str, LossSums]:
    """The clients' answers as they count in the global figures: each client's counts at most what the
    training samples' bounds allow (``policy.max_client_samples``, ``policy.max_samples_ratio`` × the round's
    median number of examples), scaled down with the same means. A tenant's evaluation set is its own, so
    its size cannot be checked; this bounds what a forged count moves the global accuracy by."""
    from fedfm.trust.update_checks import counted_samples

    counted = counted_samples({client: s.examples for client, s in sums.items()}, policy.max_client_samples,
                              policy.max_samples_ratio)
    return {client: s if counted[client] >= s.examples else s.scaled(counted[client] / s.examples)
            for client, s in sums.items()}


def summarize(task: str, sums: dict[str, LossSums]) -> dict[str, Any]:
    """``{"global": metrics, "clients": {name: metrics}}`` from per-client counts."""
    total = LossSums()
    for client_sums in sums.values():
        total.add(client_sums)
    return {"global": total.metrics(task), "clients": {client: s.metrics(task) for client, s in sums.items()}}


def _device() -> torch.device:
    """Where evaluation runs: the GPU when the process sees one, as training does (through DeepSpeed)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _length(example) -> int:
    """An example's tokens; a preference pair's, its longer conversation's."""
    if "chosen" in example:
        return max(_length(example["chosen"]), _length(example["rejected"]))
    return len(example["input_ids"])


@torch.no_grad()
def _evaluate_frame(model, tokenizer, frame, cfg: FederationConfig) -> LossSums:
    device = next(model.parameters()).device
    examples = encode(frame, tokenizer, cfg)
    # Similar lengths together: less padding, same sums.
    examples.sort(key=_length)
    sums = LossSums()
    for batch in batches(examples, tokenizer.pad_token_id, _EVAL_BATCH):
        batch = {name: value.to(device) for name, value in batch.items()}
        if cfg.task == "preference":
            from fedfm.preference import evaluation_sums

            sums.add(evaluation_sums(model, batch, cfg.preference))
            continue
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        sums.add(batch_sums(logits, batch["labels"], cfg.task))
    return sums
