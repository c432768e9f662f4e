"""Client-level differential privacy: DP-FedAvg's noisy mean, its privacy accountant, adaptive clipping.

DP-FedAvg (McMahan et al., "Learning Differentially Private Recurrent Language Models", ICLR 2018,
https://arxiv.org/abs/1710.06963): each round Poisson-samples clients with probability q, clips each
client's update to L2 norm C, adds Gaussian noise of standard deviation σ·C to the sum and divides
by the *expected* number of clients qN (a fixed denominator: the count itself would leak). One
client changes the sum by at most C, so a round is the sampled Gaussian mechanism with noise
multiplier σ, and the run is that mechanism composed once per round.

The accounting is not ours: dp-accounting (Google's, https://github.com/google/differential-privacy/
tree/main/python/dp_accounting) composes one ``PoissonSampledDpEvent(q, GaussianDpEvent(σ))`` per
round under add-or-remove-one-client adjacency, with its Rényi-DP or privacy-loss-distribution
accountant, and also calibrates σ to a target ε. What a run has spent is the list of rounds it has
released, kept in the server state, from which ε is recomputed.

Adaptive clipping (Andrew et al., "Differentially Private Learning with Adaptive Clipping",
NeurIPS 2021, https://arxiv.org/abs/1905.03871) moves C each round toward a quantile γ of the
clients' update norms, from a noised count of the clients that were not clipped: C ← C·exp(−η(b̄ − γ)).
That count is a second Gaussian query, so the update's own noise multiplier becomes
σ_Δ = (σ⁻² − (2σ_b)⁻²)^(−1/2) and the two together still cost exactly σ (their Theorem 1).

The noise comes from the operating system's cryptographically secure generator (:class:`GaussianNoise`),
and so does the key that draws each round's clients (:func:`poisson_sample`), which the server state keeps:
amplification by sampling assumes that who took part is secret, so neither may follow from the config.
``privacy.noise_seed`` makes both reproducible, for experiments only (whoever knows the seed can subtract the
noise and tell who took part).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import hmac
import logging
import math
import os
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedfm.adapters import Adapter, Tensors, l2_norm
from fedfm.config import FederationConfig
from fedfm.errors import ConfigError, PrivacyBudgetError

# Keys of the server state that belong to the privacy mechanism rather than to the strategy.
STATE_PREFIX = "privacy."


def sampling_rate(cfg: FederationConfig) -> float:
    """q: the probability that a client takes part in a round (Poisson sampling)."""
    return cfg.policy.sample_fraction


def expected_clients(cfg: FederationConfig) -> float:
    """qN: the fixed denominator of the noisy mean."""
    return sampling_rate(cfg) * len(cfg.training_clients)


def _event(q: float, sigma: float, rounds: int = 1):
    import dp_accounting

    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    return event if rounds == 1 else dp_accounting.SelfComposedDpEvent(event, rounds)


def _accountant(kind: str):
    from dp_accounting import pld, rdp

    return pld.PLDAccountant() if kind == "pld" else rdp.RdpAccountant()


def epsilon(kind: str, rounds: Iterable[tuple[float, float]], delta: float) -> float:
    """ε at ``delta`` after releasing ``rounds``, each a ``(q, σ)`` sampled Gaussian mechanism."""
    with _quiet_accountant():
        accountant = _accountant(kind)
        for q, sigma in rounds:
            accountant.compose(_event(q, sigma))
        return float(accountant.get_epsilon(delta))


@contextlib.contextmanager
def _quiet_accountant():
    """The RDP accountant logs a warning for each fractional order it cannot evaluate at large sampling
    rates (it leaves those orders out, which only loosens the bound): not news for users."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def noise_multiplier(cfg: FederationConfig) -> float:
    """σ: the configured one, or the smallest that keeps ``cfg.rounds`` rounds within ``target_epsilon``."""
    privacy = cfg.privacy
    if privacy.noise_multiplier is not None:
        return privacy.noise_multiplier
    return _calibrated(privacy.accountant, sampling_rate(cfg), cfg.rounds, privacy.target_epsilon, privacy.delta)


@functools.lru_cache(maxsize=32)  # every step asks; the search takes seconds
def _calibrated(kind: str, q: float, rounds: int, target: float, delta: float) -> float:
    import dp_accounting

    def search(kind: str, low: float, high: float) -> float:
        return float(dp_accounting.calibrate_dp_mechanism(
            lambda: _accountant(kind), lambda sigma: _event(q, sigma, rounds), target, delta,
            dp_accounting.ExplicitBracketInterval(low, high)))

    try:
        with _quiet_accountant():
            sigma = search("rdp", 1e-3, 1e4)
            # PLD is tighter than RDP (its σ is smaller) and its cost grows as σ shrinks: search just below
            return search("pld", sigma / 2, sigma) if kind == "pld" else sigma
    except (ValueError, dp_accounting.mechanism_calibration.NoBracketIntervalFoundError) as exc:
        raise ConfigError(f"privacy.target_epsilon {target} at delta {delta} over {rounds} round(s) with sampling "
                          f"rate {q}: no noise multiplier reaches it ({exc})") from None


def rounds_within_budget(cfg: FederationConfig) -> int:
    """How many of ``cfg.rounds`` rounds fit in ``privacy.target_epsilon`` (all of them without a target)."""
    privacy = cfg.privacy
    if not privacy.enabled or privacy.target_epsilon is None:
        return cfg.rounds
    event = _event(sampling_rate(cfg), noise_multiplier(cfg))
    with _quiet_accountant():
        accountant = _accountant(privacy.accountant)
        for fit in range(cfg.rounds):
            accountant.compose(event)
            if accountant.get_epsilon(privacy.delta) > privacy.target_epsilon:
                return fit
    return cfg.rounds


def check_budget(cfg: FederationConfig, round_index: int, spent: list[tuple[float, float]]) -> float:
    """ε after releasing ``round_index`` on top of ``spent``; raise :class:`PrivacyBudgetError` if that
    exceeds ``privacy.target_epsilon`` (checked before the round's adapter is released)."""
    privacy = cfg.privacy
    rounds = [*spent, (sampling_rate(cfg), noise_multiplier(cfg))]
    after = epsilon(privacy.accountant, rounds, privacy.delta)
    if privacy.target_epsilon is not None and after > privacy.target_epsilon:
        before = epsilon(privacy.accountant, spent, privacy.delta) if spent else 0.0
        raise PrivacyBudgetError(
            f"round {round_index} would spend the privacy budget: ε would reach {after:.4g} > privacy.target_epsilon "
            f"{privacy.target_epsilon} (δ = {privacy.delta}); {len(spent)} round(s) so far spent ε = {before:.4g}. "
            "The previous round's adapter is the run's last; raise the target or the noise multiplier to go on")
    return after


def count_stddev(cfg: FederationConfig) -> float:
    """The noise on the count of unclipped clients (adaptive clipping): configured, else the paper's
    expected-clients / 20, but at least 2σ so that the count takes at most ~3 % more update noise in
    small federations (σ_Δ ≤ 1.033σ)."""
    adaptive = cfg.privacy.adaptive_clipping
    assert adaptive is not None
    if adaptive.count_stddev is not None:
        return adaptive.count_stddev
    return max(expected_clients(cfg) / 20, 2 * noise_multiplier(cfg))


def update_noise_multiplier(cfg: FederationConfig) -> float:
    """σ_Δ: the update's noise multiplier, less the share adaptive clipping's count query takes."""
    sigma = noise_multiplier(cfg)
    if cfg.privacy.adaptive_clipping is None or sigma == 0:
        return sigma
    count_sigma = count_stddev(cfg)  # the count query has sensitivity 1/2 (it counts b − 1/2)
    rest = sigma ** -2 - (2 * count_sigma) ** -2
    if rest <= 0:
        raise ConfigError(f"privacy.adaptive_clipping.count_stddev {count_sigma:.4g} leaves no budget for the update "
                          f"at noise multiplier {sigma:.4g}: it must exceed {1 / (2 * sigma):.4g}")
    return rest ** -0.5


class GaussianNoise:
    """Gaussian noise for one draw site (``labels``: the round, the client, the purpose).

    Without a seed, from the operating system's cryptographically secure generator (``os.urandom``, through
    the Box-Muller transform): no one can predict it or reconstruct it from a few samples, as they could
    torch's Mersenne Twister. With ``privacy.noise_seed`` (experiments only: whoever knows the seed can
    subtract the noise), from torch's generator seeded by SHA-256 of the seed and the labels, the same in every
    process (Python's ``hash`` of a string is salted per process, so it could not be)."""

    def __init__(self, seed: int | None, *labels: object):
        self.generator = None
        if seed is not None:
            digest = hashlib.sha256(repr((seed, *labels)).encode()).digest()
            self.generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)

    def normal(self, std: float, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        """A float32 tensor of ``shape``, each entry drawn from N(0, std²)."""
        if self.generator is not None:
            return torch.normal(0.0, std, tuple(shape), generator=self.generator)
        count = math.prod(shape)
        pairs = (count + 1) // 2
        bits = np.frombuffer(os.urandom(8 * pairs), dtype=np.uint32).astype(np.float64)
        uniform = (bits + 1.0) / 2.0**32  # in (0, 1]: the logarithm below is finite
        radius = np.sqrt(-2.0 * np.log(uniform[:pairs]))
        angle = 2.0 * math.pi * uniform[pairs:]
        normal = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:count]
        return torch.from_numpy(normal * std).float().reshape(tuple(shape))


def new_sampling_key(cfg: FederationConfig) -> str:
    """The secret (hex) that draws a run's clients: fresh from the operating system, or, with
    ``privacy.noise_seed`` (experiments only), SHA-256 of the seed, the same in every run."""
    if cfg.privacy.noise_seed is not None:
        return hashlib.sha256(repr(("sampling", cfg.privacy.noise_seed)).encode()).hexdigest()
    return secrets.token_hex(32)


def poisson_sample(key: str, round_index: int, clients: Iterable[str], q: float) -> list[str]:
    """Poisson sampling keyed by ``key``: each client independently with probability ``q``, from
    HMAC-SHA256(key, round and client). Without the key, who is drawn cannot be told from the config, nor one
    round's draw from another's; with it, any process draws the same clients (a resumed run, the pipeline's
    steps and ``fedfm simulate`` alike)."""
    secret, drawn = bytes.fromhex(key), []
    for client in clients:
        digest = hmac.new(secret, f"round {round_index}/{client}".encode(), hashlib.sha256).digest()
        if int.from_bytes(digest[:8], "big") < q * 2.0**64:
            drawn.append(client)
    return drawn


@dataclass
class PrivacyState:
    """The mechanism's part of the server state: what was released so far, the current clip norm, and the
    secret key that draws each round's clients (:func:`poisson_sample`; set before round 1)."""

    rounds: list[tuple[float, float]] = field(default_factory=list)  # (q, σ) per released round
    clip_norm: float | None = None
    sampling_key: str | None = None

    @classmethod
    def split(cls, state: dict[str, Any]) -> tuple[PrivacyState, dict[str, Any]]:
        """This state and the strategy's, from one loaded server state."""
        own = cls(rounds=[tuple(pair) for pair in state.get(STATE_PREFIX + "rounds", [])],
                  clip_norm=state.get(STATE_PREFIX + "clip_norm"),
                  sampling_key=state.get(STATE_PREFIX + "sampling_key"))
        return own, {key: value for key, value in state.items() if not key.startswith(STATE_PREFIX)}

    def clip(self, cfg: FederationConfig) -> float:
        """The clip norm of the next round: adaptive clipping's latest, else the configured one."""
        return self.clip_norm if self.clip_norm is not None else float(cfg.privacy.clip_norm)

    def as_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {STATE_PREFIX + "rounds": [list(pair) for pair in self.rounds]}
        if self.clip_norm is not None:
            state[STATE_PREFIX + "clip_norm"] = self.clip_norm
        if self.sampling_key is not None:
            state[STATE_PREFIX + "sampling_key"] = self.sampling_key
        return state


def release(cfg: FederationConfig, round_index: int, state: PrivacyState) -> tuple[dict[str, Any], PrivacyState]:
    """One more released round: its privacy figures and the state after it (adaptive clipping's next norm
    is the caller's to set). The budget is checked first: a round past it raises, releasing nothing."""
    epsilon_after = check_budget(cfg, round_index, state.rounds)
    clip, sigma = state.clip(cfg), noise_multiplier(cfg)
    figures: dict[str, Any] = {"epsilon": epsilon_after, "delta": cfg.privacy.delta, "noise_multiplier": sigma,
                               "update_noise_multiplier": update_noise_multiplier(cfg), "clip_norm": clip,
                               "sampling_rate": sampling_rate(cfg)}
    return figures, PrivacyState(rounds=[*state.rounds, (sampling_rate(cfg), sigma)], clip_norm=clip,
                                 sampling_key=state.sampling_key)


def noisy_mean(cfg: FederationConfig, round_index: int, updates: Iterable[Adapter], shapes: dict[str, tuple[int, ...]],
               state: PrivacyState) -> tuple[Tensors, dict[str, Any], PrivacyState]:
    """DP-FedAvg's server step for one round: clip, sum, add noise, divide by qN.

    ``shapes`` are the tensors the clients send (only those get noise: a frozen tensor must not move).
    Returns the noisy mean update, the round's privacy figures, and the state after the round.
    """
    figures, after = release(cfg, round_index, state)
    clip = figures["clip_norm"]
    total = {name: torch.zeros(shape, dtype=torch.float32) for name, shape in shapes.items()}
    clients = unclipped = 0
    for update in updates:
        norm = l2_norm(update.tensors)
        scale = min(1.0, clip / norm) if norm > 0 else 1.0
        unclipped += norm <= clip
        for name, value in update.tensors.items():
            total[name].add_(value, alpha=scale)
        clients += 1
        update = None  # noqa: F841 — one update alive at a time
    noise = GaussianNoise(cfg.privacy.noise_seed, round_index, "update")
    for value in total.values():
        value.add_(noise.normal(figures["update_noise_multiplier"] * clip, value.shape))
        value.div_(expected_clients(cfg))
    figures.update(unclipped=unclipped, clients=clients)
    if cfg.privacy.adaptive_clipping is not None:
        after.clip_norm = figures["next_clip_norm"] = next_clip_norm(cfg, round_index, clip, unclipped)
    return total, figures, after


def next_clip_norm(cfg: FederationConfig, round_index: int, clip: float, unclipped: float) -> float:
    """Andrew et al.'s geometric update of C from the share of unclipped clients, noised here."""
    noise = float(GaussianNoise(cfg.privacy.noise_seed, round_index, "count").normal(count_stddev(cfg), (1,)))
    return clip_step(cfg, clip, unclipped + noise)


def clip_step(cfg: FederationConfig, clip: float, noised_unclipped: float) -> float:
    """``C·exp(−η(b̄ − γ))`` with ``b̄`` the noised count of unclipped clients over the expected clients."""
    adaptive = cfg.privacy.adaptive_clipping
    assert adaptive is not None
    share = noised_unclipped / expected_clients(cfg)
    return clip * math.exp(-adaptive.learning_rate * (share - adaptive.target_quantile))
