"""Simulated Byzantine clients: what an attacker sends instead of its honest update, for testing a setup.

A federation that aggregates with a plain mean is at the mercy of any one client: Blanchard et al.
(2017, "Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS; the Krum
paper) show that no aggregation rule that is a linear combination of the workers' vectors tolerates
even a single Byzantine worker, since that worker can steer the combination anywhere. This module
builds such attackers, so ``fedfm simulate --attack`` can show what a setup (its rule, update checks,
the robust preset) does when some of its clients lie. Each attack is a *kind* and a *scale*:

``sign-flip`` (scale default 10): the attacker trains honestly, then sends ``−scale · Δ`` instead of
    its update ``Δ``: a reversed and amplified step. It is the crude, rule-agnostic form of two
    attacks from the literature: Blanchard et al.'s "omniscient" Byzantine workers, which send the
    correct workers' gradients reversed and amplified, and the directed-deviation model poisoning of
    Fang et al. (2020, "Local Model Poisoning Attacks to Byzantine-Robust Federated Learning", USENIX
    Security), who craft local models that push the global model against the direction it would
    take without the attack; Fang et al. tune their crafted models against a known aggregation rule
    (Krum, trimmed mean, median), which this attack does not.
``scale`` (default 100): sends ``scale · Δ``, the honest direction with a far larger magnitude. This
    is the boosting of a malicious update in Bhagoji et al. (2019, "Analyzing Federated Learning
    through an Adversarial Lens", ICML) and the model replacement of Bagdasaryan et al. (2020, "How
    To Backdoor Federated Learning", AISTATS), who scale their (backdoored) update up so that it
    survives averaging with the honest ones. Here the scaled update is the honest one, which isolates
    the effect of the magnitude alone: under a mean one such client moves the global model
    ``scale / clients`` times as far as an honest step.
``gaussian`` (default 1.0): sends pure noise, nothing of its honest update, as the "Gaussian Byzantine
    workers" of Blanchard et al. (whose vectors are drawn from a zero-mean isotropic Gaussian). The
    noise is drawn per tensor ``t`` of the update, i.i.d. normal with mean 0 and standard deviation
    ``scale · RMS(Δ_t)``, where ``RMS(Δ_t) = sqrt(mean(Δ_t²))`` is the root mean square of the honest
    update's values in that tensor. With the default scale 1 the noise has, in expectation, the same
    norm per tensor (and so over the whole update) as the honest update: a random direction that a
    check on update norms cannot tell from an honest client. A tensor that did not move gets no noise.
``nan``: every value of the update becomes NaN: a crashed or broken client as much as a malicious
    one. Under a plain mean one NaN makes the whole global adapter NaN; FedFM's validation refuses
    non-finite updates, which fails the round unless something leaves the update out first.
``label-flip`` (no scale): a data-poisoning attack. The attacker trains honestly, but on its own
    data with every label ``i`` of the ``K`` labels replaced by label ``K − 1 − i``; what it sends is
    the honest update of that training. Tolpegin et al. (2020, "Data Poisoning Attacks Against
    Federated Learning Systems", ESORICS) study label flipping in federated learning with one source
    class relabelled as one target class; the all-class mapping ``i → K − 1 − i`` used here is the
    stronger, untargeted variant that Byzantine-robustness evaluations commonly use as their
    label-flipping baseline (Fang et al. 2020 among them). With an even ``K`` every label moves;
    with an odd ``K`` the middle one stays. It needs a classification task.

None of these is adaptive: attacks that stay within the spread of the honest updates, such as "A
Little Is Enough" (Baruch, Baruch and Goldberg 2019, NeurIPS), which shifts every coordinate by a
small multiple of the honest updates' standard deviation and so evades Krum, trimmed mean and
Bulyan, are beyond this module; passing these tests is a floor, not a proof of robustness.

Everything here is pure: tensors and frames in, new tensors and frames out; the simulation decides
which clients attack (:func:`choose_attackers`), applies :func:`poison_update` to an attacker's
update (the float32 ``local − global`` tensors that :func:`fedfm.training.train_client` writes, as
:func:`fedfm.adapters.load_adapter` returns them) and trains a label-flip attacker with
:func:`poison_data_hook`'s hook (``train_client(..., poison_data=hook)``).
"""

from __future__ import annotations

import math
import random
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import pandas as pd
import torch

from fedfm.errors import ConfigError, DataError

AttackKind = Literal["sign-flip", "scale", "gaussian", "nan", "label-flip"]
KINDS: tuple[str, ...] = get_args(AttackKind)
#: The scale of each kind when none is given; kinds without one take no scale.
DEFAULT_SCALES: dict[str, float] = {"sign-flip": 10.0, "scale": 100.0, "gaussian": 1.0}
#: Kinds that change the update the attacker sends (the others change what it trains on).
MODEL_POISONING: tuple[str, ...] = ("sign-flip", "scale", "gaussian", "nan")

ACCEPTED_FORMS = ("sign-flip[:SCALE] (sends -SCALE x its update, default 10), scale[:FACTOR] (FACTOR x its "
                  "update, default 100), gaussian[:STD] (noise of STD x its update's RMS, default 1), nan "
                  "(every value NaN), label-flip (trains on flipped labels)")

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Attack:
    """What a simulated attacker does; see the module docstring for each kind.

    ``scale`` left out (None) takes the kind's default (:data:`DEFAULT_SCALES`); ``nan`` and
    ``label-flip`` take no scale and hold 0.0. Invalid values raise :class:`ConfigError`.
    """

    kind: AttackKind
    scale: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"attack kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.kind not in DEFAULT_SCALES:
            if self.scale not in (None, 0.0):
                raise ConfigError(f"attack {self.kind} takes no scale (got {self.scale!r})")
            object.__setattr__(self, "scale", 0.0)
            return
        scale = DEFAULT_SCALES[self.kind] if self.scale is None else self.scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
            raise ConfigError(f"attack {self.kind}: scale must be a finite number > 0, not {self.scale!r}")
        object.__setattr__(self, "scale", float(scale))

    @property
    def spec(self) -> str:
        """The text :func:`parse_attack` reads back into this attack (``sign-flip:10``, ``nan``)."""
        if self.kind not in DEFAULT_SCALES:
            return self.kind
        return f"{self.kind}:{self.scale:g}"

    @property
    def poisons_update(self) -> bool:
        """Whether the attacker changes the update it sends (model poisoning), not its training data."""
        return self.kind in MODEL_POISONING

    def __str__(self) -> str:
        return self.spec


def parse_attack(text: str) -> Attack:
    """``KIND`` or ``KIND:SCALE`` (``sign-flip``, ``sign-flip:10``, ``scale:100``, ``gaussian:0.5``, ``nan``,
    ``label-flip``) as an :class:`Attack`; anything else raises :class:`ConfigError` naming ``text`` and
    listing the accepted forms."""
    def refuse(why: str) -> ConfigError:
        return ConfigError(f"attack {text!r} {why}; accepted: {ACCEPTED_FORMS}")

    if not isinstance(text, str):
        raise refuse("is not text")
    kind, colon, value = text.strip().partition(":")
    kind = kind.strip().lower()
    if kind not in KINDS:
        raise refuse("is not a known attack")
    if not colon:
        return Attack(kind)  # type: ignore[arg-type]
    if kind not in DEFAULT_SCALES:
        raise refuse(f"gives a scale, which {kind} does not take")
    try:
        scale = float(value)
    except ValueError:
        raise refuse(f"has scale {value.strip()!r}, which is not a number") from None
    if not math.isfinite(scale) or scale <= 0:
        raise refuse(f"has scale {value.strip()!r}; it must be a finite number > 0")
    return Attack(kind, scale)  # type: ignore[arg-type]


def choose_attackers(clients: Sequence[str], share: float | int, seed: int) -> list[str]:
    """The clients that attack: ``share`` of ``clients``, drawn reproducibly from ``seed``, in ``clients``' order.

    ``share`` is a fraction in (0, 1) — that share of the clients, rounded to the nearest count (halves
    up) and at least one — or a whole number ≥ 1, the count itself (``1.0`` counts as one client, not
    as every client). The draw is a seeded shuffle, so for one seed a larger count keeps the attackers
    of a smaller one. :class:`ConfigError` when ``share`` is out of range, or would make every client
    an attacker (an attack needs an honest client to attack).
    """
    clients = list(clients)
    if len(set(clients)) != len(clients):
        raise ConfigError(f"attackers: the client list has duplicates: {clients}")
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not math.isfinite(share) or share <= 0:
        raise ConfigError(f"attacker share {share!r} must be a fraction in (0, 1) or a count >= 1")
    if share < 1:
        count = max(1, math.floor(share * len(clients) + 0.5 + 1e-9))
        what = f"share {share:g} of {len(clients)} client(s) is {count}"
    elif float(share).is_integer():
        count = int(share)
        what = f"{count} attacker(s) of {len(clients)} client(s)"
    else:
        raise ConfigError(f"attacker share {share!r} must be a fraction in (0, 1) or a whole count >= 1")
    if count >= len(clients):
        raise ConfigError(f"attackers: {what}, which makes every client an attacker; leave at least one honest")
    order = list(clients)
    random.Random(f"fedfm-attackers/{seed}").shuffle(order)
    chosen = set(order[:count])
    return [client for client in clients if client in chosen]


def attack_seed(seed: int, client: str, round_index: int) -> int:
    """A seed for ``client``'s attack in ``round_index`` from the run's seed, so that noise differs
    between attackers and rounds and repeats with the run."""
    return (seed * 1_000_003 + round_index * 10_007 + zlib.crc32(f"attack/{client}".encode())) % (2**63)


def poison_update(attack: Attack, update: Tensors, *, seed: int) -> Tensors:
    """The update the attacker sends in place of its honest ``update`` (name → float tensor, the
    ``local − global`` change); ``update`` itself is left as it is.

    ``sign-flip``: ``−scale · Δ``; ``scale``: ``scale · Δ``; ``gaussian``: per tensor, noise with standard
    deviation ``scale · RMS(Δ_t)``, drawn from ``seed`` (same seed, same noise); ``nan``: every value NaN;
    ``label-flip``: the honest update (a new dict of the same tensors): its attack is in the data.
    """
    if not isinstance(attack, Attack):
        raise TypeError(f"poison_update needs an Attack, not {type(attack).__name__}")
    for name, value in update.items():
        if not value.is_floating_point():
            raise TypeError(f"update tensor {name} has dtype {value.dtype}; an update holds floating-point values")
    if attack.kind == "label-flip":
        return dict(update)
    if attack.kind == "sign-flip":
        return {name: value * -attack.scale for name, value in update.items()}
    if attack.kind == "scale":
        return {name: value * attack.scale for name, value in update.items()}
    if attack.kind == "nan":
        return {name: torch.full_like(value, math.nan) for name, value in update.items()}
    generator = torch.Generator().manual_seed(int(seed) % (2**63))
    noisy = {}
    for name in sorted(update):  # a fixed order: the same seed gives every tensor the same noise
        value = update[name]
        noise = torch.randn(value.shape, generator=generator, dtype=torch.float64)
        rms = float(value.double().pow(2).mean().sqrt()) if value.numel() else 0.0
        noisy[name] = (noise * (attack.scale * rms)).to(value.dtype).to(value.device)
    return {name: noisy[name] for name in update}


def flip_labels(frame: pd.DataFrame, label_column: str, labels: Sequence[str]) -> pd.DataFrame:
    """A copy of ``frame`` in which every label ``i`` of the ``K`` ``labels`` becomes label ``K − 1 − i``.

    The column may hold label ids (integers in ``0..K−1``, as FedFM's canonical training frames do:
    :func:`fedfm.data.load_client_data` gives classification frames an int64 ``label`` column indexing
    ``cfg.data.labels``), which become ids ``K − 1 − i``, or the label strings themselves, which become
    ``labels[K − 1 − i]``. Applying it twice gives the frame back. :class:`DataError` when the column is
    missing or holds a value that is not one of the labels.
    """
    labels = list(labels)
    if len(labels) < 2:
        raise DataError(f"flipping labels needs at least 2 labels, not {labels}")
    if label_column not in frame.columns:
        raise DataError(f"cannot flip labels: the frame has no column {label_column!r} "
                        f"(columns: {', '.join(map(str, frame.columns))})")
    count = len(labels)
    column = frame[label_column]
    flipped = frame.copy()
    if pd.api.types.is_integer_dtype(column.dtype):
        bad = sorted({int(value) for value in column if not 0 <= int(value) < count})
        if bad:
            raise DataError(f"cannot flip labels: column {label_column!r} holds label id(s) {bad[:5]} outside "
                            f"0..{count - 1} ({count} labels)")
        flipped[label_column] = (count - 1 - column).astype(column.dtype)
        return flipped
    index = {label: number for number, label in enumerate(labels)}
    unknown = sorted({str(value) for value in column if value not in index})
    if unknown:
        raise DataError(f"cannot flip labels: column {label_column!r} holds value(s) {unknown[:5]} that are not "
                        f"among the labels ({', '.join(labels)})")
    flipped[label_column] = [labels[count - 1 - index[value]] for value in column]
    return flipped


def poison_data_hook(attack: Attack, labels: Sequence[str] | None,
                     label_column: str = "label") -> Callable[[pd.DataFrame], pd.DataFrame] | None:
    """What an attacker's training data goes through (``train_client(..., poison_data=...)``): for
    ``label-flip``, :func:`flip_labels` over ``labels`` (the federation's ``cfg.data.labels``) on the
    canonical ``label`` column; None for the model-poisoning kinds, which train on honest data.
    :class:`ConfigError` for ``label-flip`` without labels (a task other than classification)."""
    if attack.kind != "label-flip":
        return None
    if not labels or len(labels) < 2:
        raise ConfigError("attack label-flip needs a classification task with at least 2 labels "
                          f"(labels: {list(labels) if labels else 'none'})")
    fixed = list(labels)

    def flip(frame: pd.DataFrame) -> pd.DataFrame:
        return flip_labels(frame, label_column, fixed)

    return flip
