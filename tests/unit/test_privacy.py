"""Differential privacy: the accountant against an independent library and published values, the budget,
DP-FedAvg's noisy mean, adaptive clipping, and the aggregate step with privacy state carried in files."""

from __future__ import annotations

import math

import pytest
import torch

from fedfm.adapters import Adapter, AdapterMeta, load_adapter, save_adapter
from fedfm.config import FederationConfig
from fedfm.errors import ConfigError, PrivacyBudgetError
from fedfm.federation import aggregate_round
from fedfm.server_state import load_server_state
from fedfm.strategies import check_federation
from fedfm.trust import privacy

FINGERPRINT = "sha256:" + "d" * 64


def dp_config(**privacy_settings) -> FederationConfig:
    settings = {"clip_norm": 1.0, **privacy_settings}
    return FederationConfig.parse({"clients": 10, "rounds": 10, "privacy": settings})


GRID = [(q, sigma, rounds, delta) for q in (0.01, 0.1, 1.0) for sigma in (0.8, 4.0)
        for rounds, delta in ((1, 1e-5), (100, 1e-6))]


@pytest.mark.parametrize("q, sigma, rounds, delta", GRID)
def test_the_accountant_agrees_with_opacus_over_a_grid(q, sigma, rounds, delta):
    """dp-accounting (ours) and Opacus (an independent implementation of the sampled Gaussian's RDP)
    give the same ε within 1 %, round by round as the federation composes it, both over dp-accounting's
    orders (Opacus's default orders stop at 63, too few for the smallest ε here)."""
    from dp_accounting.rdp.rdp_privacy_accountant import DEFAULT_RDP_ORDERS
    from opacus.accountants import RDPAccountant

    reference = RDPAccountant()
    for _ in range(rounds):
        reference.step(noise_multiplier=sigma, sample_rate=q)
    ours = privacy.epsilon("rdp", [(q, sigma)] * rounds, delta)
    theirs = reference.get_epsilon(delta, alphas=list(DEFAULT_RDP_ORDERS))
    assert ours == pytest.approx(theirs, rel=0.01)


def test_the_accountant_meets_published_values():
    # dp-accounting's own test (rdp_privacy_accountant_test.test_compute_epsilon_delta_gaussian): σ = 4.530877117
    # was chosen to give exactly (1, 1e-6)-DP for one unsampled Gaussian release.
    assert privacy.epsilon("rdp", [(1.0, 4.530877117)], 1e-6) == pytest.approx(1.0, rel=0.01)
    # The Gaussian mechanism's exact (ε, δ) curve (Balle & Wang 2018, Theorem 8): the tight PLD accountant
    # must land on it.
    sigma = 4.530877117
    eps = privacy.epsilon("pld", [(1.0, sigma)], 1e-6)

    def exact_delta(eps: float) -> float:
        phi = lambda x: 0.5 * math.erfc(-x / math.sqrt(2))  # noqa: E731 — the standard normal CDF
        return phi(1 / (2 * sigma) - eps * sigma) - math.exp(eps) * phi(-1 / (2 * sigma) - eps * sigma)

    assert exact_delta(eps * 1.01) < 1e-6 < exact_delta(eps * 0.99)
    # PLD is never looser than RDP on a sampled, composed mechanism.
    rdp, pld = (privacy.epsilon(kind, [(0.1, 1.1)] * 10, 1e-5) for kind in ("rdp", "pld"))
    assert pld <= rdp


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_a_target_epsilon_calibrates_the_noise_to_spend_at_most_it(accountant):
    cfg = dp_config(target_epsilon=4.0, accountant=accountant).with_overrides({"policy.sample_fraction": 0.5})
    sigma = privacy.noise_multiplier(cfg)
    spent = privacy.epsilon(accountant, [(0.5, sigma)] * 10, 1e-5)
    assert 3.9 < spent <= 4.0
    assert privacy.epsilon(accountant, [(0.5, sigma * 0.97)] * 10, 1e-5) > 4.0  # and no more noise than needed
    assert privacy.rounds_within_budget(cfg) == 10


def test_the_budget_stops_the_run_before_the_round_that_would_exceed_it():
    cfg = dp_config(noise_multiplier=4.0, target_epsilon=3.0).with_overrides({"rounds": 50})
    fit = privacy.rounds_within_budget(cfg)
    assert 0 < fit < 50
    spent = [(1.0, 4.0)] * fit
    assert privacy.epsilon("rdp", spent, 1e-5) <= 3.0 < privacy.epsilon("rdp", [*spent, (1.0, 4.0)], 1e-5)
    assert privacy.check_budget(cfg, fit, spent[:-1]) <= 3.0
    with pytest.raises(PrivacyBudgetError, match=rf"round {fit + 1} would spend the privacy budget: ε would reach "
                                                 rf".* > privacy.target_epsilon 3.0"):
        privacy.check_budget(cfg, fit + 1, spent)


def test_privacy_config_is_checked_up_front():
    with pytest.raises(ConfigError, match="privacy.clip_norm is required"):
        FederationConfig.parse({"privacy": {"noise_multiplier": 1.0}})
    with pytest.raises(ConfigError, match=r"strategy 'fedmedian' needs each update; choose one that works from the "
                                          r"mean \(fedadagrad, fedadam, fedavg, fedavgm"):
        check_federation(dp_config(noise_multiplier=1.0).with_overrides({"strategy.name": "fedmedian"}))
    with pytest.raises(ConfigError, match="does not pay for one round"):
        check_federation(dp_config(noise_multiplier=0.5, target_epsilon=0.01))
    with pytest.raises(ConfigError, match="leaves no budget for the update"):
        check_federation(dp_config(noise_multiplier=1.0, adaptive_clipping={"count_stddev": 0.4}))


def test_poisson_sampling_draws_each_client_with_the_sampling_rate():
    cfg = dp_config(noise_multiplier=1.0).with_overrides({"policy.sample_fraction": 0.3, "clients": 40})
    key = privacy.new_sampling_key(cfg)
    counts = [len(cfg.sampled_clients(r, sampling_key=key)) for r in range(1, 201)]
    assert len(set(counts)) > 3  # the number drawn varies, as Poisson sampling's does
    assert sum(counts) / len(counts) == pytest.approx(12, rel=0.1)
    assert cfg.sampled_clients(7, sampling_key=key) == cfg.sampled_clients(7, sampling_key=key)  # keyed


def test_under_privacy_who_takes_part_cannot_be_told_from_the_config(tmp_path):
    """Finding 9: the Poisson draw was a function of the config's public seed, which every tenant's Job is sent,
    so anyone could list each round's participants and amplification by sampling did not hold. The attack: draw
    the rounds from the seed, as the server did. Now the draw is keyed by a secret the server state keeps: the
    seed predicts nothing, a resumed run (the same state) draws the same clients, and only ``noise_seed``
    (experiments) makes the key reproducible."""
    import numpy as np

    from fedfm.federation import round_clients
    from fedfm.server_state import read_server_state, write_initial_server_state

    cfg = dp_config(noise_multiplier=1.0).with_overrides({"policy.sample_fraction": 0.5, "clients": 16})
    rounds = range(1, 9)

    def from_the_seed(round_index: int) -> list[str]:  # what the server drew before the fix
        draws = np.random.default_rng([cfg.seed, round_index]).random(16)
        return [client for client, draw in zip(cfg.training_clients, draws) if draw < 0.5]

    runs = []
    for name in ("one", "two"):
        write_initial_server_state(cfg, str(tmp_path / name))
        runs.append([round_clients(cfg, r, read_server_state(cfg, str(tmp_path / name))) for r in rounds])
    assert runs[0] != [from_the_seed(r) for r in rounds] and runs[1] != [from_the_seed(r) for r in rounds]
    assert runs[0] != runs[1]  # each run its own secret key
    resumed = read_server_state(cfg, str(tmp_path / "one"))
    assert runs[0] == [round_clients(cfg, r, resumed) for r in rounds]  # a resumed run: the same draws
    with pytest.raises(ValueError, match="secret sampling key"):  # nothing draws them without the key
        cfg.sampled_clients(1)
    seeded = cfg.with_overrides({"privacy.noise_seed": 5})
    assert privacy.new_sampling_key(seeded) == privacy.new_sampling_key(seeded) != privacy.new_sampling_key(cfg)
    # the key travels on in the server state, through the rounds' releases
    state = privacy.PrivacyState(sampling_key=privacy.new_sampling_key(cfg))
    _, after = privacy.release(cfg, 1, state)
    assert privacy.PrivacyState.split(after.as_state())[0].sampling_key == state.sampling_key


def _update(client: str, tensors: dict[str, torch.Tensor]) -> Adapter:
    return Adapter(tensors, AdapterMeta(kind="update", base_model=FINGERPRINT, peft_config={}, round=1, samples=5,
                                        client=client))


def test_the_noisy_mean_clips_each_client_and_adds_noise_of_sigma_c_over_qn():
    cfg = dp_config(noise_multiplier=2.0, noise_seed=7).with_overrides({"clients": 4, "policy.sample_fraction": 0.5})
    shapes = {"w": (200_000,)}
    big = _update("a", {"w": torch.full((200_000,), 0.01)})  # norm ≈ 4.47: scaled to 1
    small = _update("b", {"w": torch.full((200_000,), 0.001)})  # norm ≈ 0.447: kept
    mean, figures, state = privacy.noisy_mean(cfg, 1, iter([big, small]), shapes, privacy.PrivacyState())
    expected_sum = 0.01 / math.sqrt(200_000 * 1e-4) + 0.001  # the clipped big one plus the small one, per entry
    expected_clients = 0.5 * 4
    noise, _, _ = privacy.noisy_mean(cfg, 1, iter([]), shapes, privacy.PrivacyState())  # the same seed: its noise
    signal = mean["w"] - noise["w"]
    assert torch.allclose(signal, torch.full_like(signal, expected_sum / expected_clients), atol=1e-6)
    assert noise["w"].mean().item() == pytest.approx(0.0, abs=0.01)
    assert noise["w"].std().item() == pytest.approx(2.0 * 1.0 / expected_clients, rel=0.01)
    assert figures["unclipped"] == 1 and figures["clients"] == 2 and figures["clip_norm"] == 1.0
    assert figures["epsilon"] == pytest.approx(privacy.epsilon("rdp", [(0.5, 2.0)], 1e-5))
    assert state.rounds == [(0.5, 2.0)]
    again, _, _ = privacy.noisy_mean(cfg, 1, iter([big, small]), shapes, privacy.PrivacyState())
    assert torch.equal(again["w"], mean["w"])  # a noise seed reproduces the noise (experiments only)
    unseeded = cfg.model_copy(update={"privacy": cfg.privacy.model_copy(update={"noise_seed": None})})
    one, _, _ = privacy.noisy_mean(unseeded, 1, iter([big, small]), shapes, privacy.PrivacyState())
    two, _, _ = privacy.noisy_mean(unseeded, 1, iter([big, small]), shapes, privacy.PrivacyState())
    assert not torch.equal(one["w"], two["w"])


def test_adaptive_clipping_moves_the_clip_norm_toward_the_target_quantile():
    cfg = dp_config(noise_multiplier=1.0, noise_seed=1, adaptive_clipping={"target_quantile": 0.5,
                                                                            "learning_rate": 0.2})
    cfg = cfg.with_overrides({"clients": 40})
    shapes = {"w": (4,)}

    def run(norm: float, rounds: int) -> list[float]:
        state, clips = privacy.PrivacyState(), []
        for round_index in range(1, rounds + 1):
            updates = [_update(f"c{i}", {"w": torch.full((4,), norm / 2)}) for i in range(40)]
            _, figures, state = privacy.noisy_mean(cfg, round_index, iter(updates), shapes, state)
            clips.append(state.clip_norm)
        return clips

    growing = run(norm=20.0, rounds=15)  # every update is clipped: C grows toward their norm
    assert growing[0] > 1.0 and growing[-1] > 4.0  # about exp(η·(1 − γ)·15) = exp(1.5)
    shrinking = run(norm=0.01, rounds=15)  # no update is clipped: C shrinks
    assert shrinking[0] < 1.0 and shrinking[-1] < 0.3  # about exp(−1.5)


@pytest.fixture
def files(tmp_path):
    cfg = dp_config(noise_multiplier=4.0, target_epsilon=2.5, noise_seed=3).with_overrides({"clients": 3})
    tensors = {"layer.lora_A.weight": torch.randn(2, 5), "layer.lora_B.weight": torch.zeros(5, 2)}
    save_adapter(tmp_path / "g0.safetensors", tensors,
                 AdapterMeta(kind="global", base_model=FINGERPRINT, peft_config={"r": 2}, round=0))

    def updates(round_index: int):
        pairs = []
        for index, client in enumerate(cfg.client_names):
            path = tmp_path / f"{client}-{round_index}.safetensors"
            delta = {name: torch.full(value.shape, 0.1 * (index + 1)) for name, value in tensors.items()}
            save_adapter(path, delta, AdapterMeta(kind="update", base_model=FINGERPRINT, peft_config={"r": 2},
                                                  round=round_index, samples=10, client=client))
            pairs.append((client, str(path)))
        return pairs

    return cfg, tmp_path, updates


def test_the_aggregate_step_reports_epsilon_each_round_and_refuses_the_round_past_the_budget(files):
    cfg, tmp_path, updates = files
    fit = privacy.rounds_within_budget(cfg)
    assert fit >= 2
    global_uri, state_uri, spent = str(tmp_path / "g0.safetensors"), None, []
    for round_index in range(1, fit + 1):
        out, state_out = str(tmp_path / f"g{round_index}.safetensors"), str(tmp_path / f"s{round_index}")
        meta = aggregate_round(cfg, round_index, global_uri, updates(round_index), out, state_in=state_uri,
                               state_out=state_out)
        spent.append(meta.metrics["privacy"]["epsilon"])
        global_uri, state_uri = out, state_out
    assert spent == sorted(spent) and spent[-1] <= 2.5
    assert spent[-1] == pytest.approx(privacy.epsilon("rdp", [(1.0, 4.0)] * fit, 1e-5))
    assert load_server_state(state_uri, "fedavg")["privacy.rounds"] == [[1.0, 4.0]] * fit

    before = sorted(path.name for path in tmp_path.iterdir())
    with pytest.raises(PrivacyBudgetError, match=f"round {fit + 1} would spend the privacy budget"):
        aggregate_round(cfg, fit + 1, global_uri, updates(fit + 1), str(tmp_path / "past.safetensors"),
                        state_in=state_uri, state_out=str(tmp_path / "past-state"))
    after = sorted(path.name for path in tmp_path.iterdir())
    assert [name for name in after if name not in before and not name.startswith("tenant-")] == []
    assert load_adapter(global_uri).meta.round == fit  # the last adapter within the budget is untouched


def test_fedfm_validate_reports_the_budget_and_refuses_what_it_cannot_pay():
    from typer.testing import CliRunner

    from fedfm.cli import app

    result = CliRunner().invoke(app, ["validate", "--noise-multiplier", "4", "--target-epsilon", "2.5",
                                      "--dp-clip-norm", "1", "--rounds", "20"])
    assert result.exit_code == 0, result.output
    fit = privacy.rounds_within_budget(dp_config(noise_multiplier=4.0, target_epsilon=2.5)
                                       .with_overrides({"rounds": 20, "clients": 4}))
    assert f"the budget pays for {fit} of 20 rounds" in " ".join(result.output.split())  # the console wraps lines
    refused = CliRunner().invoke(app, ["validate", "--noise-multiplier", "0.5", "--target-epsilon", "0.1",
                                       "--dp-clip-norm", "1"])
    assert isinstance(refused.exception, ConfigError)  # fedfm's main() turns it into exit code 2 and one line
    assert "does not pay for one round" in str(refused.exception)


def test_unseeded_noise_comes_from_the_operating_systems_secure_generator(monkeypatch):
    """Issue 17, finding 9: the noise was torch's Mersenne Twister (seeded from the OS), whose state a few
    hundred outputs reveal. It is now os.urandom's, through Box-Muller; torch's generators play no part."""
    import os

    draws = []
    honest_urandom = os.urandom
    monkeypatch.setattr(os, "urandom", lambda size: draws.append(size) or honest_urandom(size))
    monkeypatch.setattr(torch, "normal", lambda *args, **kwargs: pytest.fail("torch's generator was used"))
    noise = privacy.GaussianNoise(None, 1, "update").normal(2.0, (400, 500))
    assert noise.shape == (400, 500) and noise.dtype == torch.float32 and draws == [8 * 100_000]
    assert noise.mean().item() == pytest.approx(0.0, abs=0.02) and noise.std().item() == pytest.approx(2.0, rel=0.01)
    fourth = (noise / 2.0).pow(4).mean().item()  # a normal's fourth moment is 3
    assert fourth == pytest.approx(3.0, rel=0.05)
    again = privacy.GaussianNoise(None, 1, "update").normal(2.0, (400, 500))
    assert not torch.equal(noise, again)
    assert privacy.GaussianNoise(None, 1).normal(1.0, (3,)).shape == (3,)  # an odd count


def test_a_noise_seed_gives_the_same_noise_in_every_process():
    """With ``privacy.noise_seed`` (experiments), a client's noise under secure aggregation was seeded with
    Python's ``hash`` of its name, which is salted per process: two processes drew different noise."""
    import json
    import os
    import subprocess
    import sys

    script = ("import json; from fedfm.trust.privacy import GaussianNoise; "
              "print(json.dumps(GaussianNoise(7, 'tenant-a', 1).normal(1.0, (4,)).tolist()))")
    outputs = {subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONHASHSEED": salt}).stdout for salt in ("1", "2")}
    assert len(outputs) == 1
    assert privacy.GaussianNoise(7, "tenant-a", 1).normal(1.0, (4,)).tolist() == json.loads(outputs.pop())
    assert not torch.equal(privacy.GaussianNoise(7, "tenant-a", 1).normal(1.0, (4,)),
                           privacy.GaussianNoise(7, "tenant-b", 1).normal(1.0, (4,)))
