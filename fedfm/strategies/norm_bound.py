"""Norm bounding: scale each client update down to at most a given L2 norm before any rule sees it.

Sun et al., "Can You Really Backdoor Federated Learning?", 2019, https://arxiv.org/abs/1911.07963
(norm bounding as a defence against model replacement). It composes with every rule because it acts
on the update stream: ``strategy.clip_norm`` in the config turns it on for whichever rule is chosen.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from fedfm.adapters import Adapter, l2_norm, scaled


def bound_norms(updates: Iterable[Adapter], max_norm: float, clipped: dict[str, float]) -> Iterator[Adapter]:
    """Yield each update with its tensors scaled by ``min(1, max_norm / ‖Δ‖₂)`` (over all its tensors
    together), one at a time; ``clipped`` gets the original norm of every update that was scaled."""
    for update in updates:
        norm = l2_norm(update.tensors)
        if norm > max_norm:
            clipped[update.meta.client or f"update {len(clipped)}"] = norm
            update = scaled(update, max_norm / norm)
        yield update
