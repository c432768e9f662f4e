"""The server's side of a round: the initial adapter, aggregation, the round record, the final export.

These are the operations the pipeline's init, aggregate, evaluate and export steps run; each reads
its inputs by URI and writes new outputs, never touching an input.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from typing import Any

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from fedfm import lora, storage
from fedfm.adapters import (Adapter, AdapterMeta, Tensors, header_of, load_adapter, read_meta, save_adapter,
                            validate_update)
from fedfm.config import FederationConfig
from fedfm.errors import AdapterValidationError, FedFMError, QuorumError, StorageError
from fedfm.head import check_counts, class_row_tensors, per_class_aggregation, per_class_rows
from fedfm.strategies import Aggregate, ServerState, build_strategy, check_federation, expected_update_shapes
from fedfm.strategies.norm_bound import bound_norms
from fedfm.trust.privacy import PrivacyState, new_sampling_key, noisy_mean
from fedfm.trust.update_checks import (Quarantine, counted_samples, judge, measure_norms, reloaded, sample_bound,
                                       skipped_record, weighed)

SERVER_STATE_FORMAT = "fedfm-server-state/1"

# Per-client figures copied from each update into the round record.
_CLIENT_FIELDS = ("samples", "steps", "train_loss", "loss_first", "loss_last", "seconds", "setup_seconds",
                  "step_seconds", "bytes_down", "update_norm", "started_at", "finished_at", "bytes_raw",
                  "bytes_stored")


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
    current = load_adapter(global_uri, who="the federation")
    if current.meta.kind != "global":
        raise FedFMError(f"{global_uri} is a client update, not a global adapter")
    strategy = build_strategy(cfg.strategy)
    privacy_state, state = PrivacyState.split(load_server_state(state_in, strategy.name) if state_in else {})
    quarantine, state = Quarantine.split(state)
    clients: dict[str, dict[str, Any]] = {}
    stream, checks_record = _checked(cfg, round_index, current, updates, missing, clients, quarantine)
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
    aggregate = strategy.aggregate(current.tensors, stream, state=state)
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


def require_quorum(cfg: FederationConfig, round_index: int, sent: int, missing: Mapping[str, str]) -> None:
    """Fail the round with :class:`QuorumError`, naming every missing client and why, when the ``sent``
    usable updates are fewer than the quorum of the round's clients (``sent`` + missing)."""
    quorum = cfg.quorum(sent + len(missing))
    if sent < quorum:
        absent = "; ".join(f"{client}: {reason}" for client, reason in sorted(missing.items()))
        raise QuorumError(f"round {round_index}: {sent} of {sent + len(missing)} clients sent an "
                          f"update, below the quorum of {quorum} (policy.min_clients) — {absent}")


def _checked(cfg: FederationConfig, round_index: int, current: Adapter, updates: list[tuple[str, str]],
             missing: dict[str, str], clients: dict[str, dict[str, Any]],
             quarantine: Quarantine) -> tuple[Iterable[Adapter], dict[str, Any] | None]:
    """The round's validated updates as ``policy`` leaves them, and its ``update_checks`` record (None:
    the norm check is off).

    Quarantined clients' updates go into ``missing`` unread. With ``policy.invalid_updates`` reject or
    ``norm_mads``, a first pass validates every update and measures its norm, and the aggregation's
    pass reloads the kept ones: invalid updates and norm outliers are rejected or quarantined (into
    ``missing``, out of ``clients``; the quorum is checked again), others clipped or bounded.
    """
    updates = quarantine.leave_out(updates, missing)
    require_quorum(cfg, round_index, len(updates), missing)
    policy = cfg.policy
    checks, rejecting = policy.update_checks, policy.invalid_updates == "reject"
    if checks.norm_mads is None and not rejecting and policy.max_samples_ratio is None:
        return weighed(_validated(cfg, round_index, current, updates, clients), policy.max_client_samples,
                       clients), None
    norms, metas = measure_norms(_validated(cfg, round_index, current, updates, clients,
                                            rejected=missing if rejecting else None))
    record, factors = None, {}
    if checks.norm_mads is not None and len(norms) < checks.min_updates:
        record = skipped_record(len(norms), checks)
    elif checks.norm_mads is not None:
        outcome = judge(norms, checks)
        for client, reason in outcome.left_out.items():
            missing[client] = reason
            del clients[client]
        if checks.action == "quarantine":
            quarantine.add(outcome.outliers, round_index)
        record, factors = outcome.record(), outcome.factors
    kept = [(client, uri) for client, uri in updates if client in clients]
    require_quorum(cfg, round_index, len(kept), missing)
    bound = sample_bound((metas[client].samples for client, _ in kept), policy.max_client_samples,
                         policy.max_samples_ratio)
    return weighed(reloaded(kept, metas, factors), bound, clients), record


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
        meta = read_meta(uri)  # validated with its update (_valid_update): the check passes again
        counts[client], samples[client] = check_counts(meta, num_labels, client=client), meta.samples
    # the samples each update counts for in the rule (as _checked bounds them), its class counts in proportion
    counted = counted_samples(samples, cfg.policy.max_client_samples, cfg.policy.max_samples_ratio)
    for client, reported in samples.items():
        if counted[client] != reported:
            counts[client] = [count * counted[client] / reported for count in counts[client]]
    samples = counted
    return per_class_rows(stream, counts, samples, num_labels)


def _sent_shapes(cfg: FederationConfig, round_index: int, global_tensors: Tensors) -> dict[str, tuple[int, ...]]:
    """The tensors (and shapes) every client of a one-rank federation sends this round."""
    shapes = expected_update_shapes(cfg, cfg.training_clients[0], round_index, global_tensors)
    return shapes if shapes is not None else {name: tuple(value.shape) for name, value in global_tensors.items()}


def _mean_update(current: Adapter, tensors: Tensors, round_index: int) -> Adapter:
    """The round's mean update as one update, for a rule that needs only the mean (``Strategy.from_mean``)."""
    meta = AdapterMeta(kind="update", base_model=current.meta.base_model, peft_config=current.meta.peft_config,
                       round=round_index, samples=1, client="mean")
    return Adapter(tensors=tensors, meta=meta)


def save_server_state(uri: str, strategy: str, round_index: int, state: ServerState) -> None:
    """Write a strategy's server state: its tensors as safetensors, its numbers in the header."""
    tensors = {key: value.detach().to(torch.float32).contiguous() for key, value in state.items()
               if isinstance(value, torch.Tensor)}
    numbers = {key: value for key, value in state.items() if not isinstance(value, torch.Tensor)}
    header = {"format": SERVER_STATE_FORMAT, "strategy": strategy, "round": str(round_index),
              "numbers": json.dumps(numbers, sort_keys=True)}
    storage.write_bytes(uri, safetensors_save(tensors, metadata=header))


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


def quarantined(cfg: FederationConfig, state_uri: str | None) -> set[str]:
    """The clients the server state at ``state_uri`` (None: round 1) has quarantined: never drawn again."""
    if not state_uri:
        return set()
    return set(Quarantine.split(load_server_state(state_uri, build_strategy(cfg.strategy).name))[0].since)


def write_initial_server_state(cfg: FederationConfig, state_out: str) -> None:
    """The server state before round 1: none, but under differential privacy the secret key that draws each
    round's clients (:func:`fedfm.trust.privacy.poisson_sample`)."""
    if not cfg.privacy.enabled:
        storage.write_bytes(state_out, b"")
        return
    state = PrivacyState(sampling_key=new_sampling_key(cfg))
    save_server_state(state_out, build_strategy(cfg.strategy).name, 0, state.as_state())


def round_clients(cfg: FederationConfig, round_index: int, state_uri: str | None) -> list[str]:
    """The clients drawn for ``round_index`` after the server state at ``state_uri``: none it has quarantined,
    and under differential privacy the Poisson draw its secret key makes."""
    state = load_server_state(state_uri, build_strategy(cfg.strategy).name) if state_uri else {}
    own, _ = PrivacyState.split(state)
    return cfg.sampled_clients(round_index, exclude=set(Quarantine.split(state)[0].since),
                               sampling_key=own.sampling_key)


def load_server_state(uri: str, strategy: str) -> ServerState:
    """The server state at ``uri``, which must be ``strategy``'s (an empty file is round 1's empty state)."""
    data = storage.read_bytes(uri)
    if not data:
        return {}
    try:
        tensors = safetensors_load(data)
        header = header_of(data) or {}
    except Exception as exc:  # safetensors and json raise several types for damaged bytes
        raise StorageError(f"server state {uri} is damaged: {exc}") from None
    if header.get("format") != SERVER_STATE_FORMAT:
        raise StorageError(f"{uri} is not a FedFM server state (format {header.get('format')!r})")
    if header.get("strategy") != strategy:
        raise StorageError(f"server state {uri} belongs to strategy {header.get('strategy')!r}, not {strategy!r}: "
                           "a run cannot change its strategy midway")
    try:
        numbers = json.loads(header["numbers"])
    except KeyError:
        raise StorageError(f"server state {uri} is damaged: its header has no 'numbers'") from None
    except (ValueError, RecursionError) as exc:
        raise StorageError(f"server state {uri} is damaged: its numbers are not JSON ({exc})") from None
    if not isinstance(numbers, dict):
        raise StorageError(f"server state {uri} is damaged: its numbers are a JSON {type(numbers).__name__}, "
                           "not an object")
    for name, value in sorted(tensors.items()):
        if value.dtype != torch.float32:
            raise StorageError(f"server state {uri} is damaged: tensor {name} is "
                               f"{str(value.dtype).removeprefix('torch.')}, not float32")
    return {**numbers, **tensors}


def _validated(cfg: FederationConfig, round_index: int, current: Adapter, updates: Iterable[tuple[str, str]],
               clients: dict[str, dict[str, Any]], rejected: dict[str, str] | None = None) -> Iterator[Adapter]:
    """Load, check and yield one update at a time, recording each client's figures in ``clients``. An
    invalid update fails the round, or with ``rejected`` goes there (client → why) and is skipped."""
    expected = set(cfg.training_clients)
    for client, uri in updates:
        if client not in expected:
            raise AdapterValidationError(f"an update for round {round_index} comes from {client!r}, which is not a "
                                         f"client of this federation ({', '.join(sorted(expected))})", client=client)
        if client in clients:
            raise AdapterValidationError(f"client {client} sent two updates for round {round_index}", client=client)
        try:
            try:
                update = _valid_update(cfg, round_index, current, client, uri)
            except FedFMError:
                raise
            except Exception as exc:  # whatever a crafted file makes a reader raise: that update's fault, named
                raise AdapterValidationError(f"client {client}'s update {uri} cannot be read: "
                                             f"{type(exc).__name__}: {exc}", client=client) from None
        except FedFMError as exc:  # unreadable, damaged or not matching the global adapter
            if rejected is None:
                raise
            rejected[client] = f"rejected (policy.invalid_updates): {exc}"
            continue
        figures = {key: update.meta.metrics[key] for key in _CLIENT_FIELDS if key in update.meta.metrics}
        figures["samples"] = update.meta.samples
        figures["bytes_up"] = storage.size(uri)
        clients[client] = figures
        yield update
        del update  # not held while the next one loads


def _valid_update(cfg: FederationConfig, round_index: int, current: Adapter, client: str, uri: str) -> Adapter:
    """``client``'s update at ``uri``, loaded and checked against the global adapter ``current``."""
    expected = expected_update_shapes(cfg, client, round_index, current.tensors)  # None: the global adapter's
    update = load_adapter(uri, who=f"client {client}", expected_shapes=expected or {
        name: tuple(value.shape) for name, value in current.tensors.items()})
    if update.meta.client != client:
        raise AdapterValidationError(f"client {client}'s update {uri} says it is from {update.meta.client!r}",
                                     client=client)
    validate_update(update, current, client=client, round_index=round_index, expected_shapes=expected)
    labels = len(cfg.data.labels or ())
    if per_class_aggregation(cfg) and class_row_tensors(current.tensors, labels):
        check_counts(update.meta, labels, client=client)  # part of the update: bad counts are rejected like it
    return update


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
