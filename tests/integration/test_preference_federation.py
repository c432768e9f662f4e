"""Issue 20: federated DPO. A 2-round, 3-tenant preference federation on the tiny causal LM and the project's
preference pairs (builtin:topics-preferences), under kfp.local and under ``fedfm simulate``: the same results, and
held-out preference accuracy that rises; secure aggregation sums the preference counts; an SFT federation's adapter
is where a DPO federation starts."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

# Few, large steps: the tiny model must learn the preference within two rounds.
DPO_SETTINGS = {"training.local_steps": 6, "training.learning_rate": 2e-2, "preference.beta": 0.5}


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6)


@pytest.fixture(scope="module")
def preference_config(tiny_config):
    return tiny_config("preference", rounds=2, clients=3, **DPO_SETTINGS)


@pytest.fixture(scope="module")
def preference_simulated(preference_config, tmp_path_factory):
    from fedfm.simulation import simulate

    return simulate(preference_config, tmp_path_factory.mktemp("preference-simulate") / "run")


def test_federated_dpo_raises_held_out_preference_accuracy_from_round_0(preference_config, preference_simulated):
    """Round 0 scores the federation's starting model against itself: every pair a tie (margin 0, accuracy 0).
    Each client's first step sees its policy equal to its reference (the round's global model), so its first loss
    is log 2 exactly. After two rounds most held-out pairs, on every tenant, rank the chosen reply above the
    rejected one, with a positive mean margin (the tiny model learns to prefer an answer over an evasive reply;
    telling the topics apart is beyond it in so few steps, so about 70 % of the pairs, not all)."""
    cfg, run = preference_config, preference_simulated
    history = run.history
    assert [record["round"] for record in history] == [0, 1, 2]
    start = history[0]["eval"]
    assert start["global"]["accuracy"] == 0 and start["global"]["reward_margin"] == 0
    assert start["global"]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for round_index in (1, 2):
        for client, figures in history[round_index]["clients"].items():
            assert figures["loss_first"] == pytest.approx(math.log(2), abs=1e-6), (round_index, client)
    final = history[-1]["eval"]
    assert final["global"]["accuracy"] > 0.6, final  # chance is 0.5
    assert final["global"]["reward_margin"] > 0
    assert final["global"]["loss"] < math.log(2)
    assert history[1]["eval"]["global"]["accuracy"] > start["global"]["accuracy"]
    assert sorted(final["clients"]) == cfg.client_names
    for client, figures in final["clients"].items():  # held-out pairs of each tenant
        assert figures["accuracy"] > 0.55 and figures["reward_margin"] > 0, (client, figures)
        assert set(figures) == {"loss", "accuracy", "reward_margin", "samples"}
    # the global figures are the tenants' sums: the pooled accuracy is the pairs-weighted mean of theirs
    pairs = sum(figures["samples"] for figures in final["clients"].values())
    assert final["global"]["samples"] == pairs == 48  # 240 rows, 20 % held out
    assert final["global"]["accuracy"] == pytest.approx(
        sum(f["accuracy"] * f["samples"] for f in final["clients"].values()) / pairs)
    metrics = json.loads(run.metrics_path.read_text())
    assert metrics["rounds"][-1]["eval"]["global"]["reward_margin"] == final["global"]["reward_margin"]
    assert run.report_path.stat().st_size > 10_000  # four panels: accuracy, eval loss, train loss, reward margin


def test_federated_dpo_under_kfp_local_equals_simulate(preference_config, preference_simulated, tmp_path):
    """The same config as a compiled pipeline run by kfp.local (every step its own process, the model loaded from
    disk each time): the same figures round by round, the same final adapter."""
    from fedfm.pipelines.local_runner import run_local

    piped = run_local(preference_config, tmp_path / "run")
    simulated = preference_simulated
    assert [r["round"] for r in piped.history] == [r["round"] for r in simulated.history] == [0, 1, 2]
    for ours, theirs in zip(simulated.history, piped.history):
        assert ours["missing"] == theirs["missing"] == {}
        for figure in ("loss", "accuracy", "reward_margin", "samples"):
            assert _close(ours["eval"]["global"][figure], theirs["eval"]["global"][figure]), (ours["round"], figure)
        for client, figures in theirs["eval"]["clients"].items():
            for figure in ("loss", "accuracy", "reward_margin"):
                assert _close(ours["eval"]["clients"][client][figure], figures[figure]), (client, figure)
        for client, figures in theirs["clients"].items():
            for figure in ("samples", "steps", "train_loss", "loss_first", "loss_last", "update_norm"):
                assert _close(ours["clients"][client][figure], figures[figure]), (ours["round"], client, figure)
    ours = load_file(simulated.adapter_dir / "adapter_model.safetensors")
    theirs = load_file(piped.adapter_dir / "adapter_model.safetensors")
    assert sorted(ours) == sorted(theirs)
    for name, value in theirs.items():
        torch.testing.assert_close(ours[name], value, rtol=1e-5, atol=1e-6)
    assert piped.report_path.stat().st_size > 10_000


def test_secure_aggregation_sums_the_preference_counts_under_masks(preference_config, tmp_path):
    """Under secure aggregation each tenant's pairs, correct pairs and margin sum travel masked; their sum gives
    the plain run's global figures (to the ring's fixed point) and no tenant's own."""
    from fedfm.simulation import simulate

    cfg = preference_config.with_overrides({"rounds": 1})
    plain = simulate(cfg, tmp_path / "plain")
    secure = simulate(cfg.with_overrides({"secure_aggregation.enabled": True}), tmp_path / "secure")
    ours, theirs = secure.history[1]["eval"], plain.history[1]["eval"]
    assert ours["clients"] == {}
    assert ours["global"]["samples"] == theirs["global"]["samples"]
    # the masked sum's adapter is the plain one to the ring's precision (2^-24), so at most a pair on the edge
    # may rank otherwise
    pairs = theirs["global"]["samples"]
    assert ours["global"]["accuracy"] == pytest.approx(theirs["global"]["accuracy"], abs=1 / pairs + 1e-9)
    for figure in ("loss", "reward_margin"):
        assert ours["global"][figure] == pytest.approx(theirs["global"][figure], abs=1e-3)


def test_an_sft_federations_adapter_is_where_a_dpo_federation_starts(tiny_config, tmp_path):
    """SFT-then-DPO: model.adapter merges a causal-lm federation's exported adapter into the base weights. The DPO
    federation's model (and the reference its evaluation measures against) is then the SFT model: round 0 scores
    ties against it, its base fingerprint is not the plain base's, and it trains from there."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedfm.modeling import build_model
    from fedfm.simulation import simulate

    base = tiny_config("preference").model.name_or_path  # the SFT federation fine-tunes the same base model
    sft = simulate(tiny_config("causal-lm", rounds=1, clients=2, **{"training.local_steps": 4,
                                                                     "model.name_or_path": base}), tmp_path / "sft")
    settings = {**DPO_SETTINGS, "training.local_steps": 2}
    cfg = tiny_config("preference", rounds=1, clients=2, **settings, **{"model.adapter": str(sft.adapter_dir)})

    started = build_model(cfg)
    plain = build_model(tiny_config("preference", rounds=1, clients=2, **settings))
    assert started.fingerprint != plain.fingerprint
    sft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path),
                                          str(sft.adapter_dir))
    ids = torch.tensor([started.tokenizer("classify the topic of : the team won the match topic :")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(started.model(input_ids=ids).logits, sft_model(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)

    run = simulate(cfg, tmp_path / "dpo")
    assert run.history[0]["eval"]["global"]["reward_margin"] == 0  # the reference is the SFT model itself
    assert run.history[1]["eval"]["global"]["reward_margin"] != 0


def test_an_unusable_start_adapter_is_named(tiny_config, tmp_path):
    from fedfm.errors import ModelError
    from fedfm.modeling import build_model

    (tmp_path / "empty").mkdir()
    cfg = tiny_config("preference", **{"model.adapter": str(tmp_path / "empty")})
    with pytest.raises(ModelError, match=r"model.adapter '.*empty' cannot be merged into .*; give the directory of "
                                         r"a PEFT adapter"):
        build_model(cfg)


def _client_side(overrides: dict) -> bool:
    """Whether these settings change what the clients train or send (a rule that freezes lora_A or keeps lora_B
    local, privacy's clipping, compression): such a round is trained anew, not aggregated from others' updates."""
    from fedfm.strategies import expected_update_shapes

    base = _base_config()
    cfg = base.with_overrides(overrides)
    return (cfg.privacy.enabled or cfg.compression.method != "none" or cfg.preference.loss != base.preference.loss
            or cfg.lora != base.lora or expected_update_shapes(cfg, cfg.client_names[0], 1, {}) is not None)


def _base_config():
    from fedfm.config import FederationConfig

    return FederationConfig.parse({"task": "preference", "model": {"name_or_path": "tiny"}, "clients": 3,
                                   "data": {"source": "builtin:topics-preferences", "partition": "iid"}})


def _cases() -> list[dict]:
    from fedfm.strategies import STRATEGIES

    return [{"strategy.name": name} for name in sorted(STRATEGIES)] + [
        {"policy.preset": "checks"},
        {"privacy.noise_multiplier": 0.3, "privacy.clip_norm": 1.0, "privacy.noise_seed": 1},
        {"preference.loss": "ipo", "compression.method": "int8"}]


def _label(overrides: dict) -> str:
    return overrides.get("strategy.name") or ("dp" if "privacy.noise_multiplier" in overrides else
                                              "-".join(str(value) for value in overrides.values()))


def test_every_strategy_and_the_checks_aggregate_preference_updates(preference_config, preference_simulated, tmp_path):
    """The DPO update is a LoRA update like any other: every registered rule and the preset's checks take the
    round-1 updates of the simulated federation (trained once, aggregated by each rule) into a new adapter."""
    from fedfm.adapters import load_adapter
    from fedfm.federation import aggregate_round

    work = preference_simulated.output / "work"
    global_uri = str(work / "round-0" / "global_adapter.safetensors")
    updates = [(client, str(work / "round-1" / "updates" / f"{client}.safetensors"))
               for client in preference_config.client_names]
    start = load_adapter(global_uri).tensors
    aggregated = [overrides for overrides in _cases() if not _client_side(overrides)]
    assert len(aggregated) >= 10
    for overrides in aggregated:
        label = _label(overrides)
        out = str(tmp_path / f"{label}.safetensors")
        meta = aggregate_round(preference_config.with_overrides(overrides), 1, global_uri, updates, out,
                               state_out=str(tmp_path / f"{label}.state"))
        assert meta.metrics["missing"] == {}, label
        moved = load_adapter(out).tensors
        assert all(torch.isfinite(value).all() for value in moved.values()), label
        assert any(not torch.equal(moved[name], start[name]) for name in start), label


@pytest.mark.parametrize("overrides", [pytest.param(case, id=_label(case)) for case in _cases() if _client_side(case)])
def test_rules_privacy_and_compression_that_change_the_clients_side_train_preference_rounds(tiny_config, tmp_path,
                                                                                            overrides):
    """Where the clients train or send otherwise (a rule's frozen or local factors, privacy's clipping, compressed
    updates): a whole round, evaluated on the preference figures."""
    from fedfm.simulation import simulate

    cfg = tiny_config("preference", rounds=1, clients=3, **{**DPO_SETTINGS, "training.local_steps": 2, **overrides})
    run = simulate(cfg, tmp_path / "run")
    record = run.history[1]
    assert record["missing"] == {}
    assert all(figures["update_norm"] > 0 for figures in record["clients"].values())
    assert record["eval"]["global"]["samples"] == 48
    assert math.isfinite(record["eval"]["global"]["reward_margin"]) and record["eval"]["global"]["reward_margin"] != 0


def test_two_deepspeed_processes_train_dpo_like_one_and_zero_3_bf16_runs(tiny_config, tmp_path):
    """Each rank computes the reference of its own micro-batches before the first step: 2 ranks under ZeRO-2 (and 1
    rank accumulating 2 micro-batches) see the same pairs per optimizer step as 1 rank, so the losses and the
    update agree; ZeRO-3 in bf16 trains too (the reference goes through the partitioned engine)."""
    from fedfm.adapters import load_adapter
    from fedfm.federation import initialize
    from fedfm.training import train_client

    cfg = tiny_config("preference", **{**DPO_SETTINGS, "training.local_steps": 3, "training.zero_stage": 2})
    initialize(cfg, str(tmp_path / "global.safetensors"))

    def train(tag: str, **overrides):
        update = tmp_path / f"{tag}.safetensors"
        result = train_client(cfg.with_overrides(overrides), "tenant-0", 1, str(tmp_path / "global.safetensors"),
                              str(update))
        return result, load_adapter(update).tensors

    one, update_one = train("one")
    assert one.loss_history[0] == pytest.approx(math.log(2), abs=1e-6) and one.loss_history[-1] < math.log(2)
    for tag, overrides in (("two", {"training.world_size": 2}),
                           ("accumulated", {"training.gradient_accumulation_steps": 2})):
        other, update_other = train(tag, **overrides)
        assert other.loss_history == pytest.approx(one.loss_history, rel=1e-4, abs=1e-4), tag
        for name, delta in update_one.items():
            torch.testing.assert_close(update_other[name], delta, rtol=1e-4, atol=1e-5)
    zero_3, update_zero_3 = train("zero-3", **{"training.zero_stage": 3, "training.bf16": True})
    assert zero_3.loss_history[-1] < zero_3.loss_history[0]
    assert all(torch.isfinite(delta).all() for delta in update_zero_3.values())


def test_a_dpo_run_that_fails_in_round_2_resumes_to_the_uninterrupted_result(preference_config, preference_simulated,
                                                                              tmp_path, monkeypatch):
    """Nothing of the reference outlives a round: a run whose round 2 fails (a client dies; every client is needed)
    resumes from round 1's checkpoint and ends with the adapter and figures of the run that never failed."""
    from fedfm import training
    from fedfm.errors import QuorumError
    from fedfm.simulation import simulate

    real = training.train_client

    def dies_in_round_2(cfg, client, round_index, global_adapter, update_out, **options):
        if client == "tenant-1" and round_index == 2:
            raise RuntimeError("tenant-1's node was preempted")
        return real(cfg, client, round_index, global_adapter, update_out, **options)

    monkeypatch.setattr(training, "train_client", dies_in_round_2)
    with pytest.raises(QuorumError):
        simulate(preference_config, tmp_path / "run")
    monkeypatch.setattr(training, "train_client", real)
    resumed = simulate(None, tmp_path / "run", resume=True)
    assert [record["round"] for record in resumed.history] == [0, 1, 2]
    for ours, theirs in zip(resumed.history, preference_simulated.history):
        for figure in ("loss", "accuracy", "reward_margin"):
            assert _close(ours["eval"]["global"][figure], theirs["eval"]["global"][figure]), (ours["round"], figure)
    ours = load_file(resumed.adapter_dir / "adapter_model.safetensors")
    theirs = load_file(preference_simulated.adapter_dir / "adapter_model.safetensors")
    for name, value in theirs.items():
        torch.testing.assert_close(ours[name], value, rtol=1e-5, atol=1e-6)
