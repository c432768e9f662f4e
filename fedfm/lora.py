"""LoRA factors inside an adapter's tensors: which are which, and views of them at other ranks.

PEFT names a LoRA layer's factors ``<module>.lora_A.weight`` (rank × in) and ``<module>.lora_B.weight``
(out × rank); ΔW = scaling · B · A. Everything else in an adapter (a new task head) is a full tensor.
A client of rank r < R sees the first r rows of each A and columns of each B (truncation), and its
update is zero-padded back to R; with the components sorted by importance (FlexLoRA's SVD order)
truncation is the best rank-r approximation.
"""

from __future__ import annotations

import torch

from fedfm.adapters import Tensors, shapes_of

A, B = ".lora_A.", ".lora_B."


def is_lora_a(name: str) -> bool:
    return A in name


def is_lora_b(name: str) -> bool:
    return B in name


def layers(tensors: Tensors) -> dict[str, tuple[str, str]]:
    """Per LoRA layer (named by its module), the names of its A and B factors."""
    return {name.split(A)[0]: (name, name.replace(A, B)) for name in tensors if is_lora_a(name)
            and name.replace(A, B) in tensors}


def rank_of(tensors: Tensors) -> int:
    """The adapter's LoRA rank (0 if it has no LoRA factors)."""
    return max((shape[0] for name, shape in shapes_of(tensors).items() if is_lora_a(name)), default=0)


def shape_at(name: str, shape: tuple[int, ...], rank: int) -> tuple[int, ...]:
    """The shape tensor ``name`` has in an adapter of ``rank``."""
    if is_lora_a(name):
        return (rank, *shape[1:])
    if is_lora_b(name):
        return (*shape[:-1], rank)
    return tuple(shape)


def truncate(tensors: Tensors, rank: int) -> Tensors:
    """The adapter at ``rank`` ≤ its own: the first ``rank`` components of every LoRA layer."""
    return {name: value[tuple(slice(0, size) for size in shape_at(name, tuple(value.shape), rank))].clone()
            for name, value in tensors.items()}


def pad_into(target: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The leading block of ``target`` that a (possibly lower-rank) ``value`` occupies: zero-padding in place."""
    return target[tuple(slice(0, size) for size in value.shape)]
