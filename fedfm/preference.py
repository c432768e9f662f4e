"""Direct preference optimization (DPO, Rafailov et al. 2023, https://arxiv.org/abs/2305.18290) of the LoRA adapter.

A pair is a prompt with a chosen and a rejected reply (:data:`fedfm.tasks.Pair`). With ``h`` the log-ratio margin
``(log π(chosen) − log π_ref(chosen)) − (log π(rejected) − log π_ref(rejected))``, the loss of a pair is
``−log σ(β·h)`` (``preference.loss: sigmoid``) or IPO's ``(h − 1/(2β))²`` (Azar et al. 2023,
https://arxiv.org/abs/2310.12036; ``ipo``, over each reply's mean per-token log-probability, as IPO defines it).
A reply's implicit reward is ``β·(log π − log π_ref)``; the reward margin of a pair is ``β·h``.

The reference model, in training: the round's global model, the base with the adapter as the client received it.
Its log-probabilities are computed once at the start of the round, before the first optimizer step, by the same
model in evaluation mode over the same micro-batches the steps then use: that is exactly the reference, with no
second copy of any weight (PEFT's ``disable_adapter`` would give the base model without the federation's adapter,
not the round's model). Nothing of it outlives the round, so resuming a run and secure aggregation (which see only
updates) are unaffected.

The reference in evaluation: the federation's starting model (the base, with ``model.adapter`` merged into it when
given, and the round-0 adapter, which changes nothing: LoRA starts with B = 0), i.e. the model with the adapter
disabled. A round's accuracy and margin then say how far the federation has moved towards the preferences since it
started; round 0 scores every pair a tie (margin 0, accuracy 0).

The loss is written here rather than taken from TRL: TRL (1.16, which would install beside the pinned stack) has no
loss function to call; its DPO loss is computed inside ``DPOTrainer._compute_loss``, which runs the model's forward
itself through the trainer's accelerator and reads the reference log-probabilities from its own batches. Adopting it
means adopting its Trainer, which would own the training loop and the batching that :mod:`fedfm.training` keeps
(DeepSpeed, the seeded batch order shared by a client's processes, the update written as the adapter's change). The
loss is a few lines, tested against a hand computation; its IPO normalizes each reply by its token count as TRL's does.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from fedfm.config import PreferenceConfig
from fedfm.tasks import IGNORE_INDEX, LossSums


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, *, mean: bool = False) -> torch.Tensor:
    """Per row, the log-probability of its target tokens (``labels`` other than the ignore index), each predicted
    from the positions before it: their sum, or with ``mean`` their mean."""
    logits, labels = logits[:, :-1, :].float(), labels[:, 1:]
    targets = labels != IGNORE_INDEX
    token_logps = torch.gather(logits.log_softmax(dim=-1), 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    total = (token_logps * targets).sum(dim=-1)
    return total / targets.sum(dim=-1).clamp(min=1) if mean else total


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, settings: PreferenceConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair, the loss and the reward margin ``β·h`` from the policy's and the reference's log-probabilities of
    the chosen and the rejected replies."""
    margin = (chosen - reference_chosen) - (rejected - reference_rejected)
    if settings.loss == "sigmoid":
        losses = -F.logsigmoid(settings.beta * margin)
    else:
        losses = (margin - 1 / (2 * settings.beta)) ** 2
    return losses, settings.beta * margin


def pair_logps(model, batch: dict[str, torch.Tensor], settings: PreferenceConfig
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The log-probabilities ``model`` gives the chosen and the rejected replies of a batch of pairs (collated by
    :func:`fedfm.tasks.collate`: the chosen conversations, then the rejected), in one forward pass."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps = sequence_logps(logits, batch["labels"], mean=settings.loss == "ipo")
    return logps.chunk(2)


def batch_loss(model, batch: dict[str, torch.Tensor], reference: tuple[torch.Tensor, torch.Tensor],
               settings: PreferenceConfig) -> torch.Tensor:
    """The mean DPO loss of a training micro-batch, against its reference log-probabilities."""
    chosen, rejected = pair_logps(model, batch, settings)
    losses, _ = dpo_loss(chosen, rejected, *(value.to(chosen.device) for value in reference), settings)
    return losses.mean()


@torch.no_grad()
def reference_logps(model, batches: Iterable[dict[str, torch.Tensor]], settings: PreferenceConfig
                    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The reference's log-probabilities for each of ``batches`` (on the model's device), from ``model`` as it is
    now, in evaluation mode (no dropout); the model is left in training mode."""
    model.eval()
    try:
        return [tuple(value.detach() for value in pair_logps(model, batch, settings)) for batch in batches]
    finally:
        model.train()


@torch.no_grad()
def evaluation_sums(model, batch: dict[str, torch.Tensor], settings: PreferenceConfig) -> LossSums:
    """One evaluation batch of pairs, scored by the PEFT ``model`` against the federation's starting model (the
    adapter disabled): summed loss, pairs, pairs whose chosen reply earns the larger reward, summed margins."""
    chosen, rejected = pair_logps(model, batch, settings)
    with model.disable_adapter():
        reference = pair_logps(model, batch, settings)
    losses, margins = dpo_loss(chosen, rejected, *reference, settings)
    pairs = len(losses)
    return LossSums(float(losses.sum()), pairs, int((margins > 0).sum()), pairs, float(margins.sum()))
