"""Step 3 (one per round): validate the clients' updates and combine them into the next global adapter."""

from typing import List

from kfp.dsl import Input, Model, Output


def aggregate(
    config: dict,
    round_index: int,
    global_adapter: Input[Model],
    updates: Input[List[Model]],
    new_global_adapter: Output[Model],
):
    """Run the configured strategy over the round's updates."""
    from fedfm import events
    from fedfm.federation import aggregate_round, step_config

    # The client name travels in each update artifact's metadata, so even an unreadable file is named.
    pairs = [(update.metadata.get("client", update.uri), update.path) for update in updates]
    with events.step("aggregate", round=round_index) as figures:
        cfg = step_config(config)
        meta = aggregate_round(cfg, round_index, global_adapter.path, pairs, new_global_adapter.path)
        figures.update(clients=len(pairs), samples=meta.samples)
    new_global_adapter.metadata.update(round=round_index, samples=meta.samples, sha256=meta.sha256,
                                       clients=sorted(meta.metrics["clients"]))
