"""Step 4 (one per round): validate the clients' updates and combine them into the next global adapter."""

from typing import List

from kfp.dsl import Artifact, Input, Model, Output


def aggregate(
    config: dict,
    round_index: int,
    start_round: int,
    run_id: str,
    global_adapter: Input[Model],
    updates: Input[List[Model]],
    server_state: Input[Artifact],
    new_global_adapter: Output[Model],
    new_server_state: Output[Artifact],
    retried_updates: Output[Artifact],
):
    """Run the configured strategy over the round's updates, if enough clients sent one; the
    strategy's server state (moments, momentum) comes in from the last round and goes on to the next.
    A round before ``start_round`` passes on the checkpoint's adapter and state that init restored.

    Below the quorum with ``policy.below_quorum: retry``, fresh clients fine-tune here, through the same
    executor as the client steps (a Job in each one's namespace in cluster mode), since a KFP DAG cannot
    grow a loop at run time; their updates are the ``retried_updates`` directory."""
    import os

    from fedfm import events, storage
    from fedfm.adapters import read_meta
    from fedfm.errors import QuorumError
    from fedfm.executors import SUCCEEDED, build_executor
    from fedfm.federation import aggregate_round, retry_below_quorum, step_config
    from fedfm.server_state import read_server_state

    os.makedirs(retried_updates.path, exist_ok=True)
    if round_index < start_round:
        for source, target in ((global_adapter, new_global_adapter), (server_state, new_server_state)):
            storage.write_bytes(target.path, storage.read_bytes(source.path))
        new_global_adapter.metadata.update(global_adapter.metadata)
        return
    with events.step("aggregate", round=round_index) as figures:
        cfg = step_config(config)
        executor = build_executor(cfg, run_id)
        # The client name travels in each update artifact's metadata, so even an unreadable file is named.
        pairs, missing = [], {}
        for update in updates:
            client = update.metadata.get("client", update.uri)
            phase = update.metadata.get("phase", SUCCEEDED)
            if phase == SUCCEEDED:
                pairs.append((client, update.path))
            else:
                missing[client] = f"{phase}: {update.metadata.get('reason', '')}".rstrip(": ")

        def finetune(client: str) -> tuple:
            uri = f"{retried_updates.path}/{client}.safetensors"
            with events.step("client_finetune", client=client, round=round_index) as shown:
                outcome = executor.train(cfg, client, round_index, global_adapter.path, uri)
                if not outcome.succeeded:
                    shown.update(phase=outcome.phase, reason=outcome.reason)
                    return None, f"{outcome.phase}: {outcome.reason}"
                meta = read_meta(uri)
                shown.update(train_loss=meta.metrics["train_loss"], samples=meta.samples,
                             seconds=meta.metrics["seconds"])
            return uri, None

        quarantined = set(read_server_state(cfg, server_state.path).quarantine.since)
        retry_below_quorum(cfg, round_index, pairs, missing, quarantined, finetune)
        try:
            meta = aggregate_round(cfg, round_index, global_adapter.path, pairs, new_global_adapter.path, missing,
                                   state_in=server_state.path, state_out=new_server_state.path)
        except QuorumError as exc:
            executor.round_failed(cfg, round_index, str(exc))
            raise
        executor.round_aggregated(cfg, meta, new_global_adapter.path)
        figures.update(clients=len(pairs), missing=len(missing), samples=meta.samples,
                       round_seconds=meta.metrics.get("round_seconds"))
    new_global_adapter.metadata.update(round=round_index, samples=meta.samples, sha256=meta.sha256,
                                       clients=sorted(meta.metrics["clients"]), missing=missing)
