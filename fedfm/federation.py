"""The server's side of a round: the initial adapter, aggregation, the round record, the final export.

These are the operations the pipeline's init, aggregate, evaluate and export steps run; each reads
its inputs by URI and writes new outputs, never touching an input.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

from fedfm import lora, storage
from fedfm.adapters import Adapter, AdapterMeta, Tensors, load_adapter, read_meta, save_adapter, shapes_of
from fedfm.config import FederationConfig
from fedfm.errors import FedFMError, StorageError
from fedfm.head import check_counts, class_row_tensors, per_class_aggregation, per_class_rows
from fedfm.server_state import RoundState, read_server_state, save_server_state
from fedfm.strategies import Aggregate, ServerState, build_strategy, check_federation, expected_update_shapes
from fedfm.strategies.norm_bound import bound_norms
from fedfm.trust.admission import admitted, require_quorum
from fedfm.trust.privacy import noisy_mean
from fedfm.trust.update_checks import counted_samples


def step_config(config: dict[str, Any]) -> FederationConfig:
    """The config a pipeline step runs with: the run's ``config`` parameter, validated, with the label
    vocabulary read from the data when the parameter leaves it out (every step derives the same one)."""
    from fedfm.data import resolve_labels

    return resolve_labels(FederationConfig.parse(config, source="pipeline parameter 'config'"))


def initialize(cfg: FederationConfig, global_out: str) -> AdapterMeta:
    """Build the base model with fresh LoRA weights and save them as round 0's global adapter.

    Every client starts from this file, so LoRA's random A matrices and any new task head are the
    same everywhere.
    """
    from fedfm.modeling import adapter_tensors, build_model, peft_config_dict

    check_federation(cfg)  # a strategy that cannot run this federation fails here, before any training
    loaded = build_model(cfg)
    meta = AdapterMeta(kind="global", base_model=loaded.fingerprint, peft_config=peft_config_dict(loaded.model),
                       round=0, metrics={"clients": {}, "created_at": time.time()})
    save_adapter(global_out, adapter_tensors(loaded.model), meta)
    return meta


def aggregate_round(cfg: FederationConfig, round_index: int, global_uri: str, updates: Iterable[tuple[str, str]],
                    global_out: str, missing: Mapping[str, str] | None = None, *, state_in: str | None = None,
                    state_out: str | None = None) -> AdapterMeta:
    """Validate every update (``(client, uri)`` pairs) against ``global_uri``, combine them with the
    configured strategy, and write the next global adapter to ``global_out``.

    The strategy's server state (moments, momentum) is read from ``state_in`` (none: round 1) and its
    next value written to ``state_out``. With ``strategy.clip_norm`` every update is first scaled to
    at most that norm. ``missing`` names the round's clients that sent nothing, with why; with fewer
    updates than the quorum (``policy.min_clients``, default all) the round fails with
    :class:`QuorumError` saying so. Any invalid update fails the round too. Either way nothing is
    written, and the previous global adapter and state are never modified. ``policy.update_checks``
    runs between validation and everything else (see :mod:`fedfm.trust.update_checks`); the updates it
    leaves out count as missing.
    """
    started = time.time()
    updates, missing = list(updates), dict(missing or {})
    require_quorum(cfg, round_index, len(updates), missing)
    refuse_overwrite(global_out, state_out)
    current = load_adapter(global_uri, who="the federation", streamed=True)  # read tensor by tensor, as updates are
    if current.meta.kind != "global":
        raise FedFMError(f"{global_uri} is a client update, not a global adapter")
    strategy = build_strategy(cfg.strategy)
    before = read_server_state(cfg, state_in)
    privacy_state, quarantine = before.privacy, before.quarantine
    clients: dict[str, dict[str, Any]] = {}
    stream, checks_record = admitted(cfg, round_index, current, updates, missing, clients, quarantine)
    clipped: dict[str, float] = {}
    if cfg.strategy.clip_norm is not None:
        stream = bound_norms(stream, cfg.strategy.clip_norm, clipped)
    if per_class_aggregation(cfg):  # the head's rows averaged over the clients holding each class (fedfm.head)
        stream = _per_class_head(cfg, current, [(c, uri) for c, uri in updates if c not in missing], stream)
    privacy_figures = None
    if cfg.privacy.enabled:  # DP-FedAvg: the rule sees only the clipped, noised mean
        shapes = _sent_shapes(cfg, round_index, current.tensors)
        mean, privacy_figures, privacy_state = noisy_mean(cfg, round_index, stream, shapes, privacy_state)
        stream = [_mean_update(current, mean, round_index)]
    aggregate = strategy.aggregate(current.tensors, stream, state=before.rule)
    failing = quarantine.count_failures(clients, missing, round_index, cfg.policy.quarantine_after_failures)
    extra_state = quarantine.as_state()
    metrics: dict[str, Any] = {"clients": clients, "missing": missing, "strategy": strategy.name}
    if privacy_figures is not None:
        aggregate.clients = sorted(clients)
        aggregate.samples = sum(figures["samples"] for figures in clients.values())
        extra_state.update(privacy_state.as_state())
        metrics["privacy"] = privacy_figures
    if clipped:  # the norms of the updates that norm bounding scaled down
        metrics["clipped"] = clipped
    if checks_record is not None:
        metrics["update_checks"] = checks_record
    if failing:  # clients quarantined for failing round after round
        metrics["quarantined"] = failing
    return write_round(cfg, round_index, current, strategy.name, aggregate, metrics, started, global_out,
                       state_out, extra_state)


def write_round(cfg: FederationConfig, round_index: int, current: Adapter, strategy: str, aggregate: Aggregate,
                metrics: dict[str, Any], started: float, global_out: str, state_out: str | None,
                extra_state: ServerState) -> AdapterMeta:
    """Write a round's new global adapter, with its record (``metrics`` plus who counted and the
    timings), and the server state after it (the rule's plus ``extra_state``: privacy, quarantine)."""
    finished = time.time()
    # "counted": the clients the rule used (a robust rule such as Krum may leave valid updates out)
    metrics.update(counted=sorted(aggregate.clients), aggregate_seconds=finished - started)
    starts = [figures["started_at"] for figures in metrics["clients"].values() if "started_at" in figures]
    if starts:  # the round proper: from the first client's start to the new global adapter
        metrics["round_seconds"] = finished - min(starts)
    peft_config = dict(current.meta.peft_config)
    rank = lora.rank_of(aggregate.tensors)
    if rank and peft_config.get("r", rank) != rank:  # a rule that changes the rank (FLoRA's stacking)
        peft_config.update(r=rank, lora_alpha=cfg.lora.scaling * rank)
    meta = AdapterMeta(kind="global", base_model=current.meta.base_model, peft_config=peft_config,
                       round=round_index, samples=aggregate.samples, metrics=metrics)
    if state_out:
        save_server_state(state_out, strategy, round_index, {**aggregate.state, **extra_state})
    save_adapter(global_out, aggregate.tensors, meta)
    return meta


def refuse_overwrite(*outputs: str | None) -> None:
    """A step's outputs must not exist yet: a finished round's files are never replaced."""
    for out in outputs:
        if out and storage.exists(out):
            raise StorageError(f"{out} already exists; refusing to overwrite it")


def _per_class_head(cfg: FederationConfig, current: Adapter, kept: list[tuple[str, str]],
                    stream: Iterable[Adapter]) -> Iterable[Adapter]:
    """``stream`` with each update's head rows rescaled to the per-class mean (:func:`fedfm.head.per_class_rows`),
    from the class counts in the headers of the updates the rule will average (``kept``). An adapter
    without a head (no tensor with one row per label) is left as it is."""
    num_labels = len(cfg.data.labels or ())
    if not class_row_tensors(current.tensors, num_labels):
        return stream
    counts, samples = {}, {}
    for client, uri in kept:
        meta = read_meta(uri)  # validated with its update (admission.valid_update): the check passes again
        counts[client], samples[client] = check_counts(meta, num_labels, client=client), meta.samples
    # the samples each update counts for in the rule (as admission.admitted bounds them), its class counts in
    # proportion
    counted = counted_samples(samples, cfg.policy.max_client_samples, cfg.policy.max_samples_ratio)
    for client, reported in samples.items():
        if counted[client] != reported:
            counts[client] = [count * counted[client] / reported for count in counts[client]]
    samples = counted
    return per_class_rows(stream, counts, samples, num_labels)


def _sent_shapes(cfg: FederationConfig, round_index: int, global_tensors: Tensors) -> dict[str, tuple[int, ...]]:
    """The tensors (and shapes) every client of a one-rank federation sends this round."""
    shapes = expected_update_shapes(cfg, cfg.training_clients[0], round_index, global_tensors)
    return shapes if shapes is not None else shapes_of(global_tensors)


def _mean_update(current: Adapter, tensors: Tensors, round_index: int) -> Adapter:
    """The round's mean update as one update, for a rule that needs only the mean (``Strategy.from_mean``)."""
    meta = AdapterMeta(kind="update", base_model=current.meta.base_model, peft_config=current.meta.peft_config,
                       round=round_index, samples=1, client="mean")
    return Adapter(tensors=tensors, meta=meta)


def retry_below_quorum(cfg: FederationConfig, round_index: int, updates: list[tuple[str, str]],
                       missing: dict[str, str], excluded: Collection[str],
                       finetune: Callable[[str], tuple[str | None, str | None]]) -> None:
    """``policy.below_quorum: retry``: while the round has fewer updates than its quorum and retries are left
    (``policy.max_retries``), draw fresh clients (:meth:`~fedfm.config.FederationConfig.fresh_clients`: not yet
    in the round, nor ``excluded``) in place of the missing ones. ``finetune(client)`` trains one and returns
    ``(update_uri, None)``, or ``(None, why)``; ``updates`` and ``missing`` grow in place. Does nothing under
    ``below_quorum: fail``: the quorum check then fails the round. ``fedfm simulate`` and the pipeline's
    aggregate step both retry through here."""
    from fedfm import events

    attempt = 1
    while cfg.policy.below_quorum == "retry" and attempt <= cfg.policy.max_retries:
        short = cfg.quorum(len(updates) + len(missing)) - len(updates)
        if short <= 0:
            return
        attempt += 1
        drawn = cfg.fresh_clients(round_index, attempt, short, exclude={*excluded, *missing, *dict(updates)})
        if not drawn:
            return
        events.emit("retry", round=round_index, attempt=attempt, clients=drawn, short=short)
        for client in drawn:
            uri, failure = finetune(client)
            if failure is None:
                updates.append((client, uri))
            else:
                missing[client] = failure


def round_clients(cfg: FederationConfig, round_index: int, state: RoundState) -> list[str]:
    """The clients drawn for ``round_index`` after the server state ``state``: none it has quarantined, and
    under differential privacy the Poisson draw its secret key makes."""
    return cfg.sampled_clients(round_index, exclude=set(state.quarantine.since),
                               sampling_key=state.privacy.sampling_key)


def logged_metrics(round_index: int, evaluation: dict[str, Any]) -> dict[str, float]:
    """A round's evaluation (:func:`fedfm.evaluation.summarize`) as the flat names and numbers a KFP Metrics
    artifact shows: ``round``, the global figures, then ``client.figure``. Only finite numbers: a figure
    nobody could measure (NaN, when no tenant answered the evaluation) cannot be serialized by KFP and
    would fail the round's step; the history's ``eval_missing`` says who did not answer."""
    flat: dict[str, Any] = {"round": round_index, **evaluation["global"]}
    for client, figures in evaluation["clients"].items():
        flat.update({f"{client}.{name}": value for name, value in figures.items()})
    return {name: value for name, value in flat.items() if math.isfinite(value)}


def round_record(adapter_uri: str, evaluation: dict[str, Any], eval_seconds: float) -> dict[str, Any]:
    """One round's line of ``metrics.json``: clients' training figures, traffic, timings and evaluation."""
    meta = read_meta(adapter_uri)
    clients = meta.metrics.get("clients", {})
    record: dict[str, Any] = {
        "round": meta.round,
        "eval": evaluation,
        "clients": clients,
        "missing": meta.metrics.get("missing", {}),
        "samples": meta.samples,
        "bytes_up": sum(client.get("bytes_up", 0) for client in clients.values()),
        "bytes_down": sum(client.get("bytes_down", 0) for client in clients.values()),
        "aggregate_seconds": meta.metrics.get("aggregate_seconds", 0.0),
        "eval_seconds": eval_seconds,
        "adapter_sha256": meta.sha256,
    }
    if "round_seconds" in meta.metrics:
        record["round_seconds"] = meta.metrics["round_seconds"]
    if "privacy" in meta.metrics:  # ε spent so far, δ, σ, the clip norm
        record["privacy"] = meta.metrics["privacy"]
    if "update_checks" in meta.metrics:  # the round's norm statistics and the outliers it handled
        record["update_checks"] = meta.metrics["update_checks"]
    if "quarantined" in meta.metrics:  # clients quarantined after failing round after round
        record["quarantined"] = meta.metrics["quarantined"]
    if "secure_aggregation" in meta.metrics:  # the protocol's survivors, threshold and dropped clients
        record["secure_aggregation"] = meta.metrics["secure_aggregation"]
    if "train_loss" in meta.metrics:  # secure aggregation: only the round's mean is known
        record["train_loss"] = meta.metrics["train_loss"]
    elif clients:
        record["train_loss"] = _weighted_mean(clients, "train_loss")
    return record


def _weighted_mean(clients: dict[str, dict[str, Any]], key: str) -> float:
    weights = [(client["samples"], client[key]) for client in clients.values() if key in client]
    total = sum(weight for weight, _ in weights)
    return sum(weight * value for weight, value in weights) / total if total else float("nan")


def append_history(history_in: str | None, record: dict[str, Any], history_out: str) -> list[dict[str, Any]]:
    """The run's rounds so far plus ``record``, written to ``history_out`` (a JSON list)."""
    history = json.loads(storage.read_bytes(history_in)) if history_in else []
    history.append(record)
    storage.write_bytes(history_out, json.dumps(history, indent=1).encode())
    return history


def export(cfg: FederationConfig, global_uri: str, directory: str) -> dict[str, Any]:
    """Write the global adapter as a PEFT directory (``PeftModel.from_pretrained`` loads it)."""
    from fedfm.modeling import export_peft_directory

    adapter = load_adapter(global_uri, who="the federation")
    provenance = {"federation": cfg.name, "rounds": adapter.meta.round,
                  "base_model_fingerprint": adapter.meta.base_model, "adapter_sha256": adapter.meta.sha256,
                  "strategy": cfg.strategy.name, "clients": cfg.training_clients}
    export_peft_directory(directory, adapter.tensors, adapter.meta.peft_config, cfg, provenance)
    return provenance
