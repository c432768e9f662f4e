"""The small contract every aggregation rule meets."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from fedfm.adapters import Adapter, Tensors

# Server state: what a rule carries from one round to the next (moments, momentum, a step count).
# Plain tensors and numbers, so the federation can save it beside the global adapter.
ServerState = dict[str, "torch.Tensor | int | float"]


@dataclass
class Aggregate:
    """What a rule returns: the new global tensors, its server state for the next round, and who counted."""

    tensors: Tensors
    state: ServerState = field(default_factory=dict)
    clients: list[str] = field(default_factory=list)
    samples: int = 0


class Strategy(ABC):
    """An aggregation rule: the next global adapter from this round's one and the clients' updates.

    ``updates`` is an iterable that loads (and validates) one update at a time, so a rule that can
    stream keeps memory independent of the number of clients. Each update's tensors are the client's
    change to the global adapter (local − global); ``update.meta.samples`` is its training-set size.
    ``state`` is the server state the rule returned last round (empty in round 1).
    """

    name: ClassVar[str]
    # whether the rule combines updates of clients training different LoRA ranks
    mixed_ranks: ClassVar[bool] = False
    # whether the rule depends on the updates only through their weighted mean, so that it can run on
    # a mean the server never saw the parts of (secure aggregation) or that carries noise (privacy)
    from_mean: ClassVar[bool] = False

    @abstractmethod
    def aggregate(self, global_tensors: Tensors, updates: Iterable[Adapter], state: ServerState) -> Aggregate:
        """Combine ``updates`` into the next global tensors."""

    def configure(self, round_index: int, client: str) -> dict[str, Any]:
        """Settings for ``client``'s fine-tune in ``round_index``, as dotted config paths
        (``{"training.learning_rate": 1e-4}``) applied over the federation's config; none by default."""
        return {}
