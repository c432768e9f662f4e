"""Step 1: validate the config against the compiled pipeline and build round 0's global adapter."""

from kfp.dsl import Artifact, Model, Output


def init_federation(
    config: dict,
    compiled_rounds: int,
    compiled_secure_aggregation: bool,
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
        if cfg.secure_aggregation.enabled != compiled_secure_aggregation:  # its steps are in the DAG or not
            raise ConfigError(f"config.secure_aggregation.enabled is {cfg.secure_aggregation.enabled}, but this "
                              f"pipeline was compiled {'with' if compiled_secure_aggregation else 'without'} its "
                              "steps: recompile with `fedfm compile`")
        meta = initialize(cfg, global_adapter.path)
        storage.write_bytes(server_state.path, b"")  # the strategy's state before round 1: none
        storage.write_bytes(history.path, b"[]")
    global_adapter.metadata.update(round=0, base_model=meta.base_model, sha256=meta.sha256)
