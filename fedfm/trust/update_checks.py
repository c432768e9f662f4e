"""Update checks beyond shapes, finite values and the base model: norm outliers against the round's own statistics.

A poisoned or broken update tends to be far larger than the honest ones (model replacement scales its
change up; a diverged client's change explodes). Each update's L2 norm, over all its tensors
together, is computed here on the server: the ``update_norm`` a client reports in its metadata is
never used, since the client that lies about its update would lie about that too. The round's
robust statistics are the median of those norms and their median absolute deviation (MAD, unscaled:
the median of ``|norm − median|``), and an update whose norm exceeds

    bound = median + norm_mads × max(MAD, MAD_FLOOR × median)

is an outlier. The floor matters when the honest norms agree well. If more than half of them are
(nearly) identical, the MAD is (nearly) 0, the bound collapses onto the median and float noise alone
would flag half the round. And honest clients on skewed data differ by tens of percent however
tightly the rest agree: on AG News with Dirichlet(0.3) label skew, honest norms ranged from 0.83 to
1.22 × the round's median while the MAD was 3-11 % of it, so a 1 % floor rejected honest clients 4-14 %
above the median (``bench/robust.py``). With a floor of 10 % of the median, an update within
``norm_mads`` × 10 % of the median is never an outlier, however tight the round, while the model
poisoning this check is for (updates scaled up 10× or more) stays far above the bound. (When the
median itself is 0 — most clients sent no change at all — the bound is 0 and any update that moves
is an outlier.)

``policy.update_checks.action`` decides what an outlier costs: ``reject`` leaves it out of this round
(it counts as missing, with a reason naming the client, its norm and the bound); ``clip`` scales it
down to exactly the bound and keeps it; ``quarantine`` leaves it out of this round and every later
one. Quarantined clients travel in the server state under ``checks.``-prefixed keys, next to the
strategy's (as the privacy accountant's ``privacy.`` keys do). With fewer than ``min_updates``
updates the statistics mean nothing and the check is skipped.

The check costs one extra pass over the updates: the first loads each one (one at a time) to
measure its norm, the aggregation's pass loads it again. The update must not change in between:
its header (which carries the sha256 of its tensors) is compared, so a file swapped after its norm
was measured fails the round instead of slipping in unchecked.

The weighted rules weigh each update by the training samples its client reports, which no one can check:
``policy.max_client_samples`` and ``policy.max_samples_ratio`` (× the round's median report; 2 under a
preset) bound what a report buys (:func:`counted_samples`).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from fedfm.adapters import Adapter, AdapterMeta, l2_norm, load_adapter, scaled
from fedfm.config import UpdateChecksConfig
from fedfm.errors import AdapterValidationError

# Keys of the server state that belong to the update checks rather than to the strategy.
STATE_PREFIX = "checks."
# The MAD never counts as less than this share of the median (see the module's docstring).
MAD_FLOOR = 0.1


@dataclass
class Quarantine:
    """The per-client bookkeeping: the clients whose updates are no longer taken (client → round it was
    quarantined in, why), and how many rounds in a row each client drawn sent no usable update."""

    since: dict[str, tuple[int, str]] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)

    @classmethod
    def split(cls, state: Mapping[str, Any]) -> tuple[Quarantine, dict[str, Any]]:
        """This state and the rest (the strategy's), from one loaded server state."""
        carried = state.get(STATE_PREFIX + "quarantined", {})
        own = cls(since={client: (int(entry["round"]), str(entry["reason"])) for client, entry in carried.items()},
                  failures={client: int(count) for client, count in state.get(STATE_PREFIX + "failures", {}).items()})
        return own, {key: value for key, value in state.items() if not key.startswith(STATE_PREFIX)}

    def as_state(self) -> dict[str, Any]:
        """The server-state keys to save (none while nobody is quarantined or failing)."""
        state: dict[str, Any] = {}
        if self.since:
            state[STATE_PREFIX + "quarantined"] = {client: {"round": round_index, "reason": reason}
                                                   for client, (round_index, reason) in sorted(self.since.items())}
        if self.failures:
            state[STATE_PREFIX + "failures"] = dict(sorted(self.failures.items()))
        return state

    def add(self, outliers: Mapping[str, str], round_index: int) -> None:
        """Quarantine ``outliers`` (client → why) from ``round_index`` on."""
        for client, reason in outliers.items():
            self.since.setdefault(client, (round_index, reason))

    def count_failures(self, sent: Iterable[str], missing: Mapping[str, str], round_index: int,
                       limit: int | None) -> dict[str, str]:
        """Count a round's outcome per client: one that sent a usable update starts again from zero, one
        that did not (``missing``) fails once more, and with ``limit`` (policy.quarantine_after_failures)
        the ones that reach it are quarantined. Returns those, with why."""
        for client in sent:
            self.failures.pop(client, None)
        newly = {}
        for client, reason in missing.items():
            if client in self.since:
                continue
            self.failures[client] = self.failures.get(client, 0) + 1
            if limit is not None and self.failures[client] >= limit:
                newly[client] = (f"sent no usable update in {self.failures[client]} rounds in a row "
                                 f"(policy.quarantine_after_failures {limit}); the last time: {reason}")
        self.add(newly, round_index)
        return newly

    def leave_out(self, updates: Iterable[tuple[str, str]], missing: dict[str, str]) -> list[tuple[str, str]]:
        """The ``(client, uri)`` pairs of clients not in quarantine; the others go into ``missing``, with why.

        Their files are not even read: nothing a quarantined client sends is looked at again.
        """
        kept = []
        for client, uri in updates:
            if client in self.since:
                round_index, reason = self.since[client]
                missing[client] = f"quarantined since round {round_index}: {reason}"
            else:
                kept.append((client, uri))
        return kept


@dataclass
class NormStatistics:
    """The round's robust statistics of update norms and the bound they give."""

    median: float
    mad: float  # as measured: the median of |norm − median|
    mad_floor: float  # MAD_FLOOR × median: the least MAD the bound uses
    bound: float


def norm_statistics(norms: Iterable[float], norm_mads: float) -> NormStatistics:
    """The median, MAD and outlier bound of a round's update norms (see the module's docstring)."""
    values = list(norms)
    median = statistics.median(values)
    mad = statistics.median(abs(value - median) for value in values)
    floor = MAD_FLOOR * median
    return NormStatistics(median=median, mad=mad, mad_floor=floor, bound=median + norm_mads * max(mad, floor))


@dataclass
class CheckOutcome:
    """What the check decided for one round: who is left out (with why), who is scaled (by how much)."""

    action: str
    norms: dict[str, float]
    stats: NormStatistics
    outliers: dict[str, str] = field(default_factory=dict)  # client → why (the ones rejected or quarantined)
    scales: dict[str, float] = field(default_factory=dict)  # client → factor its update is multiplied by (clip)
    bounded: dict[str, float] = field(default_factory=dict)  # client → factor to the median norm (clip_to_median)

    @property
    def factors(self) -> dict[str, float]:
        """Each scaled client's factor: the smaller of its clip and its bound to the median."""
        return {client: min(self.scales.get(client, 1.0), self.bounded.get(client, 1.0))
                for client in {**self.scales, **self.bounded}}

    @property
    def left_out(self) -> dict[str, str]:
        """The clients this round goes without, with the reason the round's ``missing`` gives."""
        verb = "rejected" if self.action == "reject" else "quarantined"
        return {client: f"{verb}: {reason}" for client, reason in self.outliers.items()}

    def record(self) -> dict[str, Any]:
        """The round's ``update_checks`` metrics: statistics, every norm, and what happened to each outlier."""
        record: dict[str, Any] = {"action": self.action, "median": self.stats.median, "mad": self.stats.mad,
                                  "mad_floor": self.stats.mad_floor, "bound": self.stats.bound, "norms": self.norms}
        if self.action == "clip":
            record["clipped"] = {client: self.norms[client] for client in self.scales}
        elif self.action == "reject":
            record["rejected"] = dict(self.outliers)
        else:
            record["quarantined"] = dict(self.outliers)
        if self.bounded:  # the norms scaled down to the median
            record["bounded_to_median"] = {client: self.norms[client] for client in self.bounded}
        return record


def skipped_record(count: int, checks: UpdateChecksConfig) -> dict[str, Any]:
    """The ``update_checks`` metrics of a round too small for the check."""
    return {"action": checks.action, "skipped": f"{count} update(s), fewer than policy.update_checks.min_updates "
                                                f"{checks.min_updates}: too few for the round's norm statistics"}


def measure_norms(updates: Iterable[Adapter]) -> tuple[dict[str, float], dict[str, AdapterMeta]]:
    """The first pass: each update's L2 norm (computed here, not read from its metadata) and its header,
    one update at a time."""
    norms: dict[str, float] = {}
    metas: dict[str, AdapterMeta] = {}
    for update in updates:
        client = update.meta.client or f"update {len(norms)}"
        norms[client] = l2_norm(update.tensors)
        metas[client] = update.meta
        update = None  # noqa: F841 — not held while the next one loads
    return norms, metas


def judge(norms: Mapping[str, float], checks: UpdateChecksConfig) -> CheckOutcome:
    """Find the round's outliers and decide, by ``checks.action``, what happens to each."""
    assert checks.norm_mads is not None
    stats = norm_statistics(norms.values(), checks.norm_mads)
    outcome = CheckOutcome(action=checks.action, norms=dict(norms), stats=stats)
    for client, norm in sorted(norms.items()):
        if norm <= stats.bound:
            continue
        if checks.action == "clip":
            outcome.scales[client] = stats.bound / norm
        else:
            outcome.outliers[client] = outlier_reason(client, norm, stats, checks.norm_mads)
    if checks.clip_to_median:  # FLAME's bounding (Nguyen et al. 2022, https://arxiv.org/abs/2101.02281)
        for client, norm in norms.items():
            if client not in outcome.outliers and norm > stats.median:
                outcome.bounded[client] = stats.median / norm
    return outcome


def outlier_reason(client: str, norm: float, stats: NormStatistics, norm_mads: float) -> str:
    """Why an update is an outlier: the client, its norm and the bound, with what the bound came from."""
    spread = f"MAD {stats.mad:.6g}" if stats.mad >= stats.mad_floor else f"the MAD floor {stats.mad_floor:.6g}"
    return (f"client {client}'s update norm {norm:.6g} exceeds the bound {stats.bound:.6g} "
            f"(median {stats.median:.6g} + {norm_mads:g} × {spread}; policy.update_checks.norm_mads)")


def reloaded(updates: Iterable[tuple[str, str]], metas: Mapping[str, AdapterMeta],
             scales: Mapping[str, float]) -> Iterator[Adapter]:
    """The second pass: load each kept update again, one at a time, check it is the one whose norm was
    measured, and scale it where the check clips it."""
    for client, uri in updates:
        update = load_adapter(uri, who=f"client {client}", streamed=True)
        if update.meta != metas[client]:
            raise AdapterValidationError(f"client {client}'s update {uri} changed between its norm check and the "
                                         "aggregation", client=client)
        scale = scales.get(client)
        yield update if scale is None else scaled(update, scale)
        del update  # not held while the next one loads


def sample_bound(reported: Iterable[int], max_client_samples: int | None,
                 max_samples_ratio: float | None) -> int | None:
    """The most training samples one client's report counts for in a weighted rule (None: no bound): at most
    ``max_client_samples``, and at most ``max_samples_ratio`` times the median report of the round. A client
    cannot buy the round with a large number: under a preset (ratio 2) a report of a million among reports of
    a hundred counts for two hundred."""
    reported = list(reported)
    bound = max_client_samples
    if max_samples_ratio is not None and reported:
        ratio_bound = max(1, int(max_samples_ratio * statistics.median(reported)))
        bound = ratio_bound if bound is None else min(bound, ratio_bound)
    return bound


def counted_samples(reported: Mapping[str, int], max_client_samples: int | None,
                    max_samples_ratio: float | None) -> dict[str, int]:
    """What each client's report counts for (:func:`sample_bound`)."""
    bound = sample_bound(reported.values(), max_client_samples, max_samples_ratio)
    return {client: samples if bound is None else min(samples, bound) for client, samples in reported.items()}


def weighed(updates: Iterable[Adapter], bound: int | None, clients: dict[str, dict[str, Any]]) -> Iterator[Adapter]:
    """``updates`` with each one's samples at most ``bound`` (:func:`sample_bound`); a client whose report counts
    for less gets ``samples_counted`` in its figures (``clients``)."""
    for update in updates:
        if bound is not None and update.meta.samples > bound:
            clients[update.meta.client or ""]["samples_counted"] = bound
            update.meta.samples = bound
        yield update
        del update  # not held while the next one loads
