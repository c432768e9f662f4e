"""What the server takes in from a round's updates, and with what weight: the gate between the clients'
files and the aggregation rule.

Every update is checked before the rule sees it (:func:`valid_update`): it must be from a client of the
round, once, readable, of the global adapter's base model, round and shapes (checked before anything is
allocated), with finite values. Quarantined clients' updates are left out unread. Then, as ``policy``
says: an invalid update fails the round or is rejected (``invalid_updates``); norm outliers are rejected,
clipped or quarantined (``update_checks``, :mod:`fedfm.trust.update_checks`); the samples a client reports
count only up to the round's bounds (``max_client_samples``, ``max_samples_ratio``). Fewer usable updates
than the quorum fail the round (:func:`require_quorum`), naming each missing client and why.

Updates are loaded one at a time, as the rule consumes them (:func:`admitted` returns a stream), so the
server never holds more than one update beside the running aggregate.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from fedfm import storage
from fedfm.adapters import Adapter, load_adapter, shapes_of, validate_update
from fedfm.config import FederationConfig
from fedfm.errors import AdapterValidationError, FedFMError, QuorumError
from fedfm.head import check_counts, class_row_tensors, per_class_aggregation
from fedfm.strategies import expected_update_shapes
from fedfm.trust.update_checks import (Quarantine, judge, measure_norms, reloaded, sample_bound, skipped_record,
                                       weighed)

# Per-client figures copied from each update into the round record.
CLIENT_FIELDS = ("samples", "steps", "train_loss", "loss_first", "loss_last", "seconds", "setup_seconds",
                 "step_seconds", "bytes_down", "update_norm", "started_at", "finished_at", "bytes_raw",
                 "bytes_stored")


def require_quorum(cfg: FederationConfig, round_index: int, sent: int, missing: Mapping[str, str]) -> None:
    """Fail the round with :class:`QuorumError`, naming every missing client and why, when the ``sent``
    usable updates are fewer than the quorum of the round's clients (``sent`` + missing)."""
    quorum = cfg.quorum(sent + len(missing))
    if sent < quorum:
        absent = "; ".join(f"{client}: {reason}" for client, reason in sorted(missing.items()))
        raise QuorumError(f"round {round_index}: {sent} of {sent + len(missing)} clients sent an "
                          f"update, below the quorum of {quorum} (policy.min_clients) — {absent}")


def admitted(cfg: FederationConfig, round_index: int, current: Adapter, updates: list[tuple[str, str]],
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
        return weighed(validated(cfg, round_index, current, updates, clients), policy.max_client_samples,
                       clients), None
    norms, metas = measure_norms(validated(cfg, round_index, current, updates, clients,
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



def validated(cfg: FederationConfig, round_index: int, current: Adapter, updates: Iterable[tuple[str, str]],
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
                update = valid_update(cfg, round_index, current, client, uri)
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
        figures = {key: update.meta.metrics[key] for key in CLIENT_FIELDS if key in update.meta.metrics}
        figures["samples"] = update.meta.samples
        figures["bytes_up"] = storage.size(uri)
        clients[client] = figures
        yield update
        del update  # not held while the next one loads


def valid_update(cfg: FederationConfig, round_index: int, current: Adapter, client: str, uri: str) -> Adapter:
    """``client``'s update at ``uri``, loaded and checked against the global adapter ``current``."""
    expected = expected_update_shapes(cfg, client, round_index, current.tensors)  # None: the global adapter's
    update = load_adapter(uri, who=f"client {client}", expected_shapes=expected or shapes_of(current.tensors),
                          streamed=True)
    if update.meta.client != client:
        raise AdapterValidationError(f"client {client}'s update {uri} says it is from {update.meta.client!r}",
                                     client=client)
    validate_update(update, current, client=client, round_index=round_index, expected_shapes=expected)
    labels = len(cfg.data.labels or ())
    if per_class_aggregation(cfg) and class_row_tensors(current.tensors, labels):
        check_counts(update.meta, labels, client=client)  # part of the update: bad counts are rejected like it
    return update
