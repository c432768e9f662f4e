"""Helpers for rules that need every update at once (coordinate-wise statistics, pairwise distances)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from fedfm.adapters import Adapter, Tensors
from fedfm.errors import FedFMError


def collect(updates: Iterable[Adapter], rule: str) -> tuple[list[str], list[int], dict[str, torch.Tensor]]:
    """Clients, sample counts and, per tensor name, the updates stacked along a new first axis (float64)."""
    clients, samples, stacked = [], [], {}
    columns: dict[str, list[torch.Tensor]] = {}
    for update in updates:
        clients.append(update.meta.client or f"update {len(clients)}")
        samples.append(update.meta.samples)
        for name, delta in update.tensors.items():
            columns.setdefault(name, []).append(delta.to(torch.float64))
    if not clients:
        raise FedFMError(f"{rule}: no client updates to aggregate")
    for name, column in columns.items():
        stacked[name] = torch.stack(column)
    return clients, samples, stacked


def apply(global_tensors: Tensors, delta: dict[str, torch.Tensor]) -> Tensors:
    """``global + delta`` back in float32."""
    return {name: (global_tensors[name].to(torch.float64) + delta[name]).to(torch.float32) for name in global_tensors}
