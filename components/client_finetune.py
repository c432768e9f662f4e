"""Step 3 (one per client per round): fine-tune the global adapter on the client's own data."""

from kfp.dsl import Input, Model, Output


def client_finetune(
    config: dict,
    client: str,
    round_index: int,
    start_round: int,
    run_id: str,
    global_adapter: Input[Model],
    update: Output[Model],
):
    """Train ``client``'s LoRA adapter from the global one and output its update.

    Where the training runs is the config's ``execution.mode``: here, or as a Job in the client's
    namespace. A client that produced nothing (its Job failed, timed out, or sent a bad update) is
    not a failed step: ``update`` then says why in its metadata, and aggregation decides on quorum.
    A round before ``start_round`` was restored from a checkpoint: nothing trains.
    """
    from fedfm import events, storage
    from fedfm.adapters import read_meta
    from fedfm.executors import build_executor
    from fedfm.federation import step_config

    if round_index < start_round:
        storage.write_bytes(update.path, b"")
        update.metadata.update(client=client, round=round_index, phase="Restored", reason="from the checkpoint")
        return
    with events.step("client_finetune", client=client, round=round_index) as figures:
        cfg = step_config(config)
        outcome = build_executor(cfg, run_id).train(cfg, client, round_index, global_adapter.path, update.path)
        if outcome.succeeded:
            meta = read_meta(update.path)
            figures.update(train_loss=meta.metrics["train_loss"], samples=meta.samples, seconds=meta.metrics["seconds"])
            update.metadata.update(samples=meta.samples, train_loss=meta.metrics["train_loss"], sha256=meta.sha256)
        else:
            # an artifact must exist; its metadata says there is no update. Over one a late fine-tune still
            # wrote (past the deadline), which is not to be used
            storage.write_bytes(update.path, b"", overwrite=True)
            figures.update(phase=outcome.phase, reason=outcome.reason)
    update.metadata.update(client=client, round=round_index, phase=outcome.phase, reason=outcome.reason)
