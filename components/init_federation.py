"""Step 1: validate the config against the compiled pipeline and build round 0's global adapter."""

from kfp.dsl import Artifact, Model, Output


def init_federation(
    config: dict,
    compiled_rounds: int,
    global_adapter: Output[Model],
    server_state: Output[Artifact],
    history: Output[Artifact],
):
    """Check the run's config against the compiled pipeline and write the initial global adapter."""
    from fedfm import events, storage
    from fedfm.errors import ConfigError
    from fedfm.federation import initialize, step_config

    with events.step("init"):
        cfg = step_config(config)
        if cfg.rounds != compiled_rounds:
            raise ConfigError(f"config.rounds is {cfg.rounds}, but this pipeline was compiled for {compiled_rounds} "
                              "rounds (rounds are unrolled at compile time): recompile with `fedfm compile`")
        meta = initialize(cfg, global_adapter.path)
        storage.write_bytes(server_state.path, b"")  # the strategy's state before round 1: none
        storage.write_bytes(history.path, b"[]")
    global_adapter.metadata.update(round=0, base_model=meta.base_model, sha256=meta.sha256)
