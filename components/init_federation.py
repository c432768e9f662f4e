"""Step 1: the run's config (the ``config`` parameter and the typed run parameters the Kubeflow UI shows,
:mod:`fedfm.run_parameters`), validated against the compiled pipeline; then round 0's global adapter, or the
checkpoint a resumed run starts from. Every later step runs with the config this step returns."""

from typing import NamedTuple

from kfp.dsl import Artifact, Model, Output


def init_federation(
    config: dict,
    run_id: str,
    start_round: int,
    compiled_rounds: int,
    compiled_secure_aggregation: bool,
    compiled_execution_mode: str,
    compiled_parameters: dict,
    model: str,
    dataset: str,
    learning_rate: float,
    local_steps: int,
    batch_size: int,
    lora_r: int,
    lora_alpha: float,
    strategy: str,
    strategy_params: dict,
    sample_fraction: float,
    min_clients: int,
    target_epsilon: float,
    seed: int,
    global_adapter: Output[Model],
    server_state: Output[Artifact],
    history: Output[Artifact],
) -> NamedTuple("Outputs", [("run_config", dict)]):
    """Merge the run parameters into ``config`` (each one set to other than its ``compiled_parameters`` value
    wins), check the result against the compiled pipeline and write the initial global adapter; with
    ``start_round`` > 1, write round ``start_round - 1``'s checkpointed adapter, server state and history
    instead (the rounds before ``start_round`` then pass these through unchanged). Returns the merged config
    (a named output: kfp.local hands a loop's tasks another task's "Output" as the loop's item)."""
    from fedfm import checkpoint, events, storage
    from fedfm.adapters import read_meta
    from fedfm.errors import CheckpointError, ConfigError
    from fedfm.federation import initialize, step_config
    from fedfm.run_parameters import apply_run_parameters
    from fedfm.server_state import write_initial_server_state

    with events.step("init"):
        config = apply_run_parameters(config, compiled_parameters, {
            "model": model, "dataset": dataset, "learning_rate": learning_rate, "local_steps": local_steps,
            "batch_size": batch_size, "lora_r": lora_r, "lora_alpha": lora_alpha, "strategy": strategy,
            "strategy_params": strategy_params, "sample_fraction": sample_fraction, "min_clients": min_clients,
            "target_epsilon": target_epsilon, "seed": seed})
        cfg = step_config(config)
        if cfg.rounds != compiled_rounds:
            raise ConfigError(f"config.rounds is {cfg.rounds}, but this pipeline was compiled for {compiled_rounds} "
                              "rounds (rounds are unrolled at compile time): recompile with `fedfm compile`")
        if cfg.secure_aggregation.enabled != compiled_secure_aggregation:  # its steps are in the DAG or not
            raise ConfigError(f"config.secure_aggregation.enabled is {cfg.secure_aggregation.enabled}, but this "
                              f"pipeline was compiled {'with' if compiled_secure_aggregation else 'without'} its "
                              "steps: recompile with `fedfm compile`")
        if cfg.execution.mode != compiled_execution_mode:  # the tasks' pod settings were compiled for that mode
            raise ConfigError(f"config.execution.mode is {cfg.execution.mode}, but this pipeline was compiled for "
                              f"{compiled_execution_mode} mode (its tasks' resources, volumes and Secrets are "
                              "compiled in): recompile with `fedfm compile`")
        if start_round > compiled_rounds:
            raise CheckpointError(f"start_round {start_round} is past the pipeline's {compiled_rounds} rounds")
        start = checkpoint.require_start(checkpoint.checkpoint_root(cfg, run_id), start_round)
        if start is None:
            meta = initialize(cfg, global_adapter.path)
            write_initial_server_state(cfg, server_state.path)
            storage.write_bytes(history.path, b"[]")
        else:
            for role, output in (("global_adapter", global_adapter), ("server_state", server_state),
                                 ("history", history)):
                storage.write_bytes(output.path, storage.read_bytes(start.uri(role)))
            meta = read_meta(global_adapter.path)
    global_adapter.metadata.update(round=meta.round, base_model=meta.base_model, sha256=meta.sha256)
    return (config,)
