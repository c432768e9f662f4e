"""The classification head under label skew: its initialization from class prototypes, and its per-class mean.

A classification task puts a new head on the base model (BERT's ``classifier``, Llama's ``score``): one
row (and bias) per class, randomly initialized, trained and averaged with the LoRA layers. Under label
skew each tenant holds a few of the classes, and two things go wrong (measured in ``bench/README.md``):

- From a random head, a federated round moves the model far less than the same optimizer steps taken
  one after another: after 10 rounds on CLINC150 (150 intents) FedAvg was near chance where the
  centralized model passed 0.8.
- A class's row is learned by the few tenants that hold the class, but FedAvg divides their change by
  every tenant's samples, so each class's row shrinks by its own factor.

So, following FedNCM (Legate et al., "Guiding The Last Layer in Federated Learning with Pre-Trained
Models", NeurIPS 2023, https://arxiv.org/abs/2306.10397):

- ``head.init: prototypes``: in round 1 each client sets the rows of the classes it holds to the
  nearest-class-mean classifier of its data, in the head's own input features (the base model's, since
  every LoRA B is still zero): for a class mean μ_c, the logits ``τ·(μ_c·h − ‖μ_c‖²/2)`` (the Euclidean
  nearest mean), with ``τ = 1 / (σ²·√d)``, σ² the within-class variance per feature and d the feature
  width: the softmax temperature of a shared isotropic Gaussian, softened by √d (1/σ² alone is far too
  confident over a few hundred correlated features). Rows and biases are taken relative to the
  features of one input every client shares, the empty text (:func:`init_from_prototypes`).
- ``head.aggregation: per-class``: the server averages a class's row over the clients that hold the
  class, each weighted by its examples of that class (``Σₖ nₖ_c·Δₖ_c / Σₖ nₖ_c``), instead of by every
  client's samples. In round 1 this makes the prototypes exactly the sample-weighted class means of the
  federation, whatever the skew. Clients send their class counts in the update's header (never
  published); the server checks them (one count per class, summing to the client's samples).

The per-class mean is a rescaling of each update's head rows (:func:`per_class_rows`) before a rule
that works from the sample-weighted mean (``Strategy.from_mean``), so FedAvg, FedAvgM, the FedOpt
family and the LoRA-aware rules built on FedAvg all get it. It is not applied where the server never
sees one client's update: under differential privacy (the noisy mean) and secure aggregation (the
masked sum); there the head is averaged by samples like every other tensor. Robust rules (median,
trimmed mean, Krum) combine the rows by their own rule.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch

from fedfm.adapters import Adapter, AdapterMeta, Tensors, mapped, shapes_of
from fedfm.errors import AdapterValidationError, TrainingError
from fedfm.lora import is_lora_a, is_lora_b

COUNTS_KEY = "class_counts"  # the update header's metrics key that carries a client's examples per class

# Head inputs that vary less than this share of their size within a class barely depend on the input (an
# untrained model's): their class means are float32 rounding, and τ = 1/(σ²√d) would blow that up.
MIN_RELATIVE_SPREAD = 1e-3


def class_row_tensors(tensors: Tensors, num_labels: int) -> list[str]:
    """The head's per-class tensors in an adapter: full (not LoRA) tensors with one row per class (the
    last linear layer's weight and bias)."""
    return sorted(name for name, shape in shapes_of(tensors).items()
                  if not (is_lora_a(name) or is_lora_b(name)) and len(shape) >= 1 and shape[0] == num_labels)


def class_counts(labels: Iterable[int], num_labels: int) -> list[int]:
    """How many of ``labels`` (class indices) fall in each class."""
    counts = torch.bincount(torch.as_tensor(list(labels), dtype=torch.long), minlength=num_labels)
    return [int(count) for count in counts[:num_labels]]


def per_class_aggregation(cfg) -> bool:
    """Whether the server averages the head's rows per class this run (``head.aggregation`` per-class, a
    classification task, a rule that works from the sample-weighted mean, and a server that sees each
    update: neither differential privacy nor secure aggregation). Clients send their class counts only then."""
    from fedfm.strategies import STRATEGIES

    strategy = STRATEGIES.get(cfg.strategy.name)
    return (cfg.task == "classification" and cfg.head.aggregation == "per-class" and strategy is not None
            and strategy.from_mean and not cfg.privacy.enabled and not cfg.secure_aggregation.enabled)


def prototypes_this_round(cfg, round_index: int) -> bool:
    """Whether a client's fine-tune this round starts by setting the head from class prototypes: round 1 of a
    classification task with ``head.init`` prototypes, not under differential privacy, whose clipping to
    ``privacy.clip_norm`` would erase the rows."""
    return (cfg.task == "classification" and cfg.head.init == "prototypes" and round_index == 1
            and not cfg.privacy.enabled)


def check_counts(meta: AdapterMeta, num_labels: int, *, client: str) -> list[int]:
    """The class counts ``client``'s update carries, checked: one non-negative integer per class,
    summing to the samples it reports (so the counts can weigh it no more than its samples do)."""
    counts = meta.metrics.get(COUNTS_KEY)
    if not isinstance(counts, list) or len(counts) != num_labels:
        got = f"{len(counts)} values" if isinstance(counts, list) else repr(counts)[:40]
        raise AdapterValidationError(f"client {client}'s update must carry {COUNTS_KEY} with one count per class "
                                     f"({num_labels}; head.aggregation per-class); it has {got}", client=client)
    if not all(type(count) is int and count >= 0 for count in counts):
        raise AdapterValidationError(f"client {client}'s {COUNTS_KEY} must be non-negative integers", client=client)
    if sum(counts) != meta.samples:
        raise AdapterValidationError(f"client {client}'s {COUNTS_KEY} sum to {sum(counts)}, but it reports "
                                     f"{meta.samples} samples", client=client)
    return counts


def per_class_rows(updates: Iterable[Adapter], counts: Mapping[str, Sequence[int]],
                   samples: Mapping[str, int], num_labels: int) -> Iterator[Adapter]:
    """Rescale each update's head rows so that the rule's sample-weighted mean becomes the per-class mean.

    ``counts`` and ``samples`` hold, per client, the checked class counts (:func:`check_counts`) and
    samples of every update the rule will average. With nₖ_c client k's examples of class c, nₖ its
    samples, n_c and N their sums over the clients, row c of client k is multiplied by
    ``(nₖ_c / nₖ)·(N / n_c)``, so that ``Σₖ nₖ·Δ'ₖ_c / N = Σₖ nₖ_c·Δₖ_c / n_c``. A class no client
    holds keeps its row (factor 0).
    """
    totals = torch.tensor([list(row) for row in counts.values()], dtype=torch.float64).sum(0)
    everyone = float(sum(samples.values()))
    scale_of_total = torch.where(totals > 0, everyone / totals.clamp(min=1), torch.zeros_like(totals))
    for update in updates:
        client = update.meta.client
        factors = (torch.tensor(counts[client], dtype=torch.float64) / samples[client]
                   * scale_of_total).to(torch.float32)
        rows = set(class_row_tensors(update.tensors, num_labels))

        def rescaled(name: str, value: torch.Tensor, factors: torch.Tensor = factors,
                     rows: set[str] = rows) -> torch.Tensor:
            return value * factors.reshape((num_labels,) + (1,) * (value.dim() - 1)) if name in rows else value

        yield mapped(update, rescaled)  # rescaled as each tensor is read: the update is not held whole


def head_linear(model, num_labels: int) -> torch.nn.Linear:
    """The head's last linear layer (``num_labels`` outputs) among the modules PEFT trains in full."""
    candidates = [module for name, module in model.named_modules()
                  if "modules_to_save" in name and isinstance(module, torch.nn.Linear)
                  and module.out_features == num_labels]
    if not candidates:
        raise TrainingError(f"head.init prototypes: no trainable linear layer with {num_labels} outputs (the "
                            "classification head) in this model; set head.init to random")
    return candidates[-1]


@torch.no_grad()
def init_from_prototypes(model, batches: Iterable[dict[str, torch.Tensor]], num_labels: int,
                         reference: dict[str, torch.Tensor]) -> list[int]:
    """Set the head rows of the classes in ``batches`` to their nearest-class-mean classifier (see the
    module's docstring) and return the examples per class. Rows of absent classes are left as they are.

    The features are the head's last linear layer's inputs, taken with a forward hook in eval mode (no
    dropout), so any architecture whose head ends in a linear layer works. They are taken relative to
    ``reference``'s features (one input every client has: the empty text), m: row ``τ·(μ_c − m)`` and bias
    ``τ·(‖m‖² − ‖μ_c‖²)/2`` give the logits ``τ·(μ_c·h − ‖μ_c‖²/2)`` less ``τ·(m·h − ‖m‖²/2)``, the same
    for every class and every client, so the softmax is the nearest-mean one and rows set by different
    clients fit together; and no row or bias holds the features' common part (on a model whose features
    barely vary, ``τ·μ_c`` and ``τ·‖μ_c‖²`` would be huge numbers whose float32 difference is noise).
    """
    linear = head_linear(model, num_labels)
    width = linear.in_features
    sums = torch.zeros(num_labels, width, dtype=torch.float64)
    squares = magnitude = 0.0
    counts = torch.zeros(num_labels, dtype=torch.float64)
    was_training = model.training
    model.eval()
    try:
        origin = _head_inputs(model, linear, reference)[0]
        for batch in batches:
            features = _head_inputs(model, linear, batch) - origin
            sums.index_add_(0, batch["labels"], features)
            counts.index_add_(0, batch["labels"], torch.ones(len(features), dtype=torch.float64))
            squares += float(features.pow(2).sum())
            magnitude += float((features + origin).pow(2).sum())
    finally:
        model.train(was_training)
    held = counts > 0
    means = sums[held] / counts[held, None]  # μ_c − m
    examples = float(counts.sum())
    within = (squares - float((counts[held] * means.pow(2).sum(1)).sum())) / (examples * width)
    if within < (MIN_RELATIVE_SPREAD ** 2) * magnitude / (examples * width):
        print(f"head.init prototypes: the head's input features vary by less than {MIN_RELATIVE_SPREAD:g} of their size "
              "within a class (an untrained model?); the head keeps its initialization", file=sys.stderr)
        return [int(count) for count in counts]
    tau = 1.0 / (max(within, 1e-12) * math.sqrt(width))
    if linear.bias is not None:
        rows = tau * means
        # τ(‖m‖² − ‖μ_c‖²)/2 = −τ(‖μ_c − m‖²/2 + (μ_c − m)·m)
        bias = -tau * (0.5 * means.pow(2).sum(1) + means @ origin)
        linear.bias[held] = bias.to(linear.bias.dtype)
    else:  # no bias to carry the squared norms: rows of equal norm, so the logits rank classes by cosine to μ_c
        rows = tau * (means + origin)
        rows = torch.nn.functional.normalize(rows, dim=1) * rows.norm(dim=1).mean()
    linear.weight[held] = rows.to(linear.weight.dtype)
    return [int(count) for count in counts]


def _head_inputs(model, linear: torch.nn.Linear, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """What ``linear`` (the head's last layer) receives for each example of ``batch``, in float64."""
    seen: list[torch.Tensor] = []
    hook = linear.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].detach()))
    try:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        hook.remove()
    features = seen[-1]
    if features.dim() == 3:  # a decoder's head scores every position; the model reads the last real token's
        last = batch["attention_mask"].sum(1) - 1
        features = features[torch.arange(len(features)), last]
    return features.to(torch.float64)
