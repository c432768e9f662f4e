"""FedAvg: the sample-weighted mean of client updates.

McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data",
AISTATS 2017, https://arxiv.org/abs/1602.05629
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch

from fedfm.adapters import Adapter, Tensors, shapes_of
from fedfm.errors import FedFMError
from fedfm.strategies.base import Aggregate, ServerState, Strategy


def weighted_mean(global_tensors: Tensors, updates: Iterable[Adapter], rule: str) -> tuple[Tensors, list[str], int]:
    """``Σ nᵢ·Δᵢ / Σ nᵢ`` over the updates, streamed: the clients, and their total sample count.

    Holds one float32 accumulator the size of the adapter plus the update being read, whatever the
    number of clients. It accumulates in float32, the updates' own precision (as Flower does for
    float32 weights): a float64 accumulator would be 10× slower, the sum of N terms is exact to about
    √N float32 roundings, and a tensor an update leaves out counts as zero for that client.
    """
    weighted_sum = {name: torch.zeros(shape, dtype=torch.float32) for name, shape in shapes_of(global_tensors).items()}
    clients: list[str] = []
    total = 0
    with _one_thread():
        for update in updates:
            weight = update.meta.samples
            for name in update.tensors:  # by name: no tensor of it is still held when the next one is read
                weighted_sum[name].add_(update.tensors[name], alpha=weight)  # shapes validated equal to the global's
            total += weight
            clients.append(update.meta.client or f"update {len(clients)}")
            update = None  # let it go before the iterator loads the next one: one update alive at a time
    if not clients:
        raise FedFMError(f"{rule}: no client updates to aggregate")
    for value in weighted_sum.values():
        value.div_(total)
    return weighted_sum, clients, total


@contextlib.contextmanager
def _one_thread():
    """Run memory-bound adds on one thread: as fast as two on an idle machine, and on a busy one (a pod
    sharing its node's cores) two threads wait on each other per small tensor and run 10-100× slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class FedAvg(Strategy):
    """``global + Σ nᵢ·Δᵢ / Σ nᵢ``, with nᵢ the client's sample count; streams (see :func:`weighted_mean`)."""

    name = "fedavg"
    from_mean = True

    def aggregate(self, global_tensors: Tensors, updates: Iterable[Adapter], state: ServerState) -> Aggregate:
        mean, clients, total = weighted_mean(global_tensors, updates, self.name)
        for name, value in mean.items():  # in place: the result reuses the accumulator
            value.add_(global_tensors[name])
        return Aggregate(tensors=mean, state=state, clients=clients, samples=total)
