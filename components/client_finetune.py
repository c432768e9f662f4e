"""Step 2 (one per client per round): fine-tune the global adapter on the client's own data."""

from kfp.dsl import Input, Model, Output


def client_finetune(
    config: dict,
    client: str,
    round_index: int,
    global_adapter: Input[Model],
    update: Output[Model],
):
    """Train ``client``'s LoRA adapter from the global one (DeepSpeed) and output its update."""
    from fedfm import events
    from fedfm.federation import step_config
    from fedfm.training import train_client

    with events.step("client_finetune", client=client, round=round_index) as figures:
        cfg = step_config(config)
        result = train_client(cfg, client, round_index, global_adapter.path, update.path)
        figures.update(train_loss=result.train_loss, samples=result.samples, seconds=result.seconds)
    update.metadata.update(client=client, round=round_index, samples=result.samples,
                           train_loss=result.train_loss, sha256=result.sha256)
