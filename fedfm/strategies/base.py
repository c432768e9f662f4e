"""The small contract every aggregation rule meets."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from fedfm.adapters import Adapter, Tensors


@dataclass
class Aggregate:
    """What a rule returns: the new global tensors, its server state for the next round, and who counted."""

    tensors: Tensors
    state: dict[str, Any] = field(default_factory=dict)
    clients: list[str] = field(default_factory=list)
    samples: int = 0


class Strategy(ABC):
    """An aggregation rule: the next global adapter from this round's one and the clients' updates.

    ``updates`` is an iterable that loads (and validates) one update at a time, so a rule that can
    stream keeps memory independent of the number of clients. Each update's tensors are the client's
    change to the global adapter (local − global); ``update.meta.samples`` is its training-set size.
    ``state`` is the server state a rule keeps across rounds (moments, momentum); it must be plain
    tensors and numbers so the federation checkpoint can store it.
    """

    name: ClassVar[str]

    @abstractmethod
    def aggregate(self, global_tensors: Tensors, updates: Iterable[Adapter], state: dict[str, Any]) -> Aggregate:
        """Combine ``updates`` into the next global tensors."""
