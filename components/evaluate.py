"""Step 5 (one per round, and once for round 0): evaluate the global adapter on every tenant's held-out
data, and checkpoint the federation's state: the round is done."""

from kfp.dsl import Artifact, Input, Metrics, Model, Output


def evaluate(
    config: dict,
    run_id: str,
    round_index: int,
    global_adapter: Input[Model],
    server_state: Input[Artifact],
    history_in: Input[Artifact],
    history: Output[Artifact],
    metrics: Output[Metrics],
):
    """Log the round's global and per-client metrics, extend the run's history (metrics.json) and write
    the round's checkpoint (:mod:`fedfm.checkpoint`) where the run keeps them.

    Each tenant evaluates where its data is (``execution.mode``); only the counts come back. A round
    whose record is in the history already was restored from a checkpoint (a resumed run): its history
    passes on unchanged.
    """
    import json
    import tempfile
    import time

    from fedfm import checkpoint, events, storage
    from fedfm.evaluation import bounded, summarize
    from fedfm.executors import build_executor
    from fedfm.federation import append_history, logged_metrics, round_record, step_config

    restored = storage.read_bytes(history_in.path)
    if any(record["round"] == round_index for record in json.loads(restored)):
        storage.write_bytes(history.path, restored)
        return
    with events.step("evaluate", round=round_index) as figures:
        cfg = step_config(config)
        started = time.time()
        executor = build_executor(cfg, run_id)
        note = None
        if cfg.secure_aggregation.enabled:  # the survivors' counts, summed under masks: no tenant's in the clear
            from fedfm.secure_pipeline import evaluate_round

            with tempfile.TemporaryDirectory() as scratch:
                result, unanswered, note = evaluate_round(cfg, executor, round_index, global_adapter.path,
                                                          server_state.path, scratch)
        else:
            sums, unanswered = executor.evaluate(cfg, round_index, global_adapter.path, cfg.client_names)
            result = summarize(cfg.task, bounded(sums, cfg.policy))
        executor.round_evaluated(cfg, round_index, result["global"])
        record = round_record(global_adapter.path, result, time.time() - started)
        record["eval_missing"] = unanswered
        if note:
            record["eval_note"] = note
        append_history(history_in.path, record, history.path)
        figures.update(record["eval"]["global"])
    root = checkpoint.checkpoint_root(cfg, run_id)
    if root is not None:
        saved = checkpoint.save(root, cfg, round_index, global_adapter.path, server_state.path, history.path)
        executor.round_checkpointed(cfg, round_index, saved.directory)
    for name, value in logged_metrics(round_index, result).items():
        metrics.log_metric(name, value)
