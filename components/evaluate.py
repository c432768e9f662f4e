"""Step 5 (one per round, and once for round 0): evaluate the global adapter on every tenant's held-out data."""

from kfp.dsl import Artifact, Input, Metrics, Model, Output


def evaluate(
    config: dict,
    run_id: str,
    global_adapter: Input[Model],
    history_in: Input[Artifact],
    history: Output[Artifact],
    metrics: Output[Metrics],
):
    """Log the round's global and per-client metrics and extend the run's history (metrics.json).

    Each tenant evaluates where its data is (``execution.mode``); only the counts come back.
    """
    import time

    from fedfm import events
    from fedfm.adapters import read_meta
    from fedfm.evaluation import summarize
    from fedfm.executors import build_executor
    from fedfm.federation import append_history, round_record, step_config

    round_index = read_meta(global_adapter.path).round
    with events.step("evaluate", round=round_index) as figures:
        cfg = step_config(config)
        started = time.time()
        executor = build_executor(cfg, run_id)
        sums, unanswered = executor.evaluate(cfg, round_index, global_adapter.path, cfg.client_names)
        result = summarize(cfg.task, sums)
        executor.round_evaluated(cfg, round_index, result["global"])
        record = round_record(global_adapter.path, result, time.time() - started)
        record["eval_missing"] = unanswered
        append_history(history_in.path, record, history.path)
        figures.update(record["eval"]["global"])
    metrics.log_metric("round", round_index)
    for name, value in result["global"].items():
        metrics.log_metric(name, value)
    for client, client_metrics in result["clients"].items():
        for name, value in client_metrics.items():
            metrics.log_metric(f"{client}.{name}", value)
