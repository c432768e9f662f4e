"""Simulated attackers: each attack's update, the label flip, parsing and the choice of attackers."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from fedfm.attacks import (
    Attack,
    attack_seed,
    choose_attackers,
    flip_labels,
    parse_attack,
    poison_data_hook,
    poison_update,
)
from fedfm.errors import ConfigError, DataError


def _update(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "base_model.model.layer.0.lora_A.weight": torch.randn(8, 384, generator=generator) * 1e-3,
        "base_model.model.layer.0.lora_B.weight": torch.randn(384, 8, generator=generator) * 5e-2,
        "base_model.model.classifier.weight": torch.randn(4, 384, generator=generator),
    }


# --- the attacks' updates ---------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [10.0, 1.0, 0.5])
def test_sign_flip_sends_minus_scale_times_the_update(scale):
    update = _update()
    kept = {name: value.clone() for name, value in update.items()}
    poisoned = poison_update(Attack("sign-flip", scale), update, seed=0)
    assert set(poisoned) == set(update)
    for name, value in update.items():
        assert torch.equal(poisoned[name], -scale * value), name
        assert torch.equal(value, kept[name])  # the honest update is left as it was


def test_sign_flip_and_scale_defaults():
    assert Attack("sign-flip").scale == 10.0 and Attack("scale").scale == 100.0 and Attack("gaussian").scale == 1.0
    update = _update()
    poisoned = poison_update(Attack("scale"), update, seed=0)
    assert all(torch.equal(poisoned[name], 100.0 * value) for name, value in update.items())
    flipped = poison_update(Attack("sign-flip"), update, seed=0)
    assert all(torch.equal(flipped[name], -10.0 * value) for name, value in update.items())


def test_scale_sends_scale_times_the_update():
    update = _update(1)
    poisoned = poison_update(Attack("scale", 37.5), update, seed=0)
    for name, value in update.items():
        assert torch.equal(poisoned[name], 37.5 * value), name
        assert poisoned[name].dtype == value.dtype


def test_nan_makes_every_value_nan():
    update = _update()
    poisoned = poison_update(Attack("nan"), update, seed=0)
    for name, value in update.items():
        assert poisoned[name].shape == value.shape and poisoned[name].dtype == value.dtype
        assert torch.isnan(poisoned[name]).all(), name
    assert all(torch.isfinite(value).all() for value in update.values())


def test_label_flip_leaves_the_update_alone():
    update = _update()
    poisoned = poison_update(Attack("label-flip"), update, seed=0)
    assert poisoned is not update and poisoned.keys() == update.keys()
    assert all(poisoned[name] is update[name] for name in update)


@pytest.mark.parametrize("scale", [1.0, 0.5, 3.0])
def test_gaussian_noise_has_the_documented_std_per_tensor(scale):
    """Pure noise (nothing of the honest update), std = scale × the honest tensor's RMS."""
    big = torch.randn(1000, 1000, generator=torch.Generator().manual_seed(3)) * 0.02 + 0.01
    small = torch.full((512, 64), -4.0)
    update = {"big": big, "small": small}
    poisoned = poison_update(Attack("gaussian", scale), update, seed=11)
    for name, value in update.items():
        rms = float(value.double().pow(2).mean().sqrt())
        noise = poisoned[name].double()
        assert float(noise.std()) == pytest.approx(scale * rms, rel=0.03), name
        assert abs(float(noise.mean())) < 0.03 * scale * rms, name
    big_noise = poisoned["big"].double().flatten()
    assert abs(float(torch.corrcoef(torch.stack([big_noise, big.double().flatten()]))[0, 1])) < 0.01  # unrelated
    # with scale 1 the noise is, in expectation, as large as the honest update: a norm check cannot tell
    if scale == 1.0:
        norm = math.sqrt(sum(float(v.double().pow(2).sum()) for v in update.values()))
        noisy_norm = math.sqrt(sum(float(v.double().pow(2).sum()) for v in poisoned.values()))
        assert noisy_norm == pytest.approx(norm, rel=0.02)


def test_gaussian_noise_is_reproducible_from_the_seed():
    update = _update()
    attack = parse_attack("gaussian:0.5")
    first, again = poison_update(attack, update, seed=7), poison_update(attack, update, seed=7)
    other = poison_update(attack, update, seed=8)
    assert all(torch.equal(first[name], again[name]) for name in update)
    assert all(not torch.equal(first[name], other[name]) for name in update)
    # the tensors' order in the dict does not change the noise each one gets
    reordered = poison_update(attack, dict(reversed(list(update.items()))), seed=7)
    assert all(torch.equal(first[name], reordered[name]) for name in update)
    assert list(first) == list(update)


def test_gaussian_noise_on_a_tensor_that_did_not_move_is_zero():
    poisoned = poison_update(Attack("gaussian", 2.0), {"still": torch.zeros(10, 10), "empty": torch.zeros(0)},
                             seed=1)
    assert torch.equal(poisoned["still"], torch.zeros(10, 10)) and poisoned["empty"].numel() == 0


def test_attack_seeds_differ_between_clients_and_rounds():
    seeds = {attack_seed(0, client, round_index) for client in ("tenant-0", "tenant-1") for round_index in (1, 2)}
    assert len(seeds) == 4 and attack_seed(0, "tenant-0", 1) == attack_seed(0, "tenant-0", 1)
    assert attack_seed(1, "tenant-0", 1) != attack_seed(0, "tenant-0", 1)


def test_poison_update_refuses_integer_tensors():
    with pytest.raises(TypeError, match="update tensor ids has dtype torch.int64"):
        poison_update(Attack("scale"), {"ids": torch.arange(3)}, seed=0)


# --- parsing ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, kind, scale", [
    ("sign-flip", "sign-flip", 10.0), ("sign-flip:10", "sign-flip", 10.0), ("sign-flip:2.5", "sign-flip", 2.5),
    ("scale", "scale", 100.0), ("scale:100", "scale", 100.0), ("scale:1e3", "scale", 1000.0),
    ("gaussian", "gaussian", 1.0), ("gaussian:0.5", "gaussian", 0.5),
    ("nan", "nan", 0.0), ("label-flip", "label-flip", 0.0), (" Sign-Flip : 3 ", "sign-flip", 3.0),
])
def test_parse_attack(text, kind, scale):
    attack = parse_attack(text)
    assert attack == Attack(kind, scale if kind in ("sign-flip", "scale", "gaussian") else None)
    assert attack.scale == scale
    assert parse_attack(attack.spec) == attack and str(attack) == attack.spec
    assert attack.poisons_update == (kind != "label-flip")


@pytest.mark.parametrize("text", ["", "flip", "sign_flip", "scale:", "scale:x", "scale:0", "scale:-3", "scale:inf",
                                  "gaussian:nan", "nan:1", "label-flip:2", "krum"])
def test_parse_errors_name_the_input_and_list_the_accepted_forms(text):
    with pytest.raises(ConfigError) as caught:
        parse_attack(text)
    message = str(caught.value)
    assert repr(text) in message
    for form in ("sign-flip[:SCALE]", "scale[:FACTOR]", "gaussian[:STD]", "nan", "label-flip"):
        assert form in message


def test_attack_checks_its_fields():
    with pytest.raises(ConfigError, match="attack kind 'flip' is not one of"):
        Attack("flip")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="attack scale: scale must be a finite number > 0"):
        Attack("scale", -1.0)
    with pytest.raises(ConfigError, match="attack nan takes no scale"):
        Attack("nan", 2.0)
    with pytest.raises(TypeError):
        poison_update("scale:10", _update(), seed=0)  # type: ignore[arg-type]


# --- attackers ---------------------------------------------------------------------------------------

CLIENTS = [f"tenant-{index}" for index in range(10)]


@pytest.mark.parametrize("share, count", [(0.2, 2), (0.1, 1), (0.01, 1), (0.25, 3), (0.3, 3), (0.5, 5), (0.9, 9),
                                          (1, 1), (2, 2), (2.0, 2), (9, 9)])
def test_attackers_are_the_right_count(share, count):
    chosen = choose_attackers(CLIENTS, share, seed=0)
    assert len(chosen) == count and len(set(chosen)) == count and set(chosen) <= set(CLIENTS)
    assert chosen == [client for client in CLIENTS if client in chosen]  # in the clients' order


def test_attackers_are_reproducible_from_the_seed():
    assert choose_attackers(CLIENTS, 0.2, seed=3) == choose_attackers(CLIENTS, 0.2, seed=3)
    draws = {tuple(choose_attackers(CLIENTS, 0.3, seed=seed)) for seed in range(20)}
    assert len(draws) > 10  # the seed matters
    assert set(choose_attackers(CLIENTS, 2, seed=5)) <= set(choose_attackers(CLIENTS, 4, seed=5))  # nested


@pytest.mark.parametrize("share", [0, -0.1, 1.5, 10, 11, 0.99, float("nan"), True, "0.2"])
def test_attacker_share_out_of_range_is_a_config_error(share):
    with pytest.raises(ConfigError, match="attacker"):
        choose_attackers(CLIENTS, share, seed=0)


def test_every_client_an_attacker_is_refused():
    with pytest.raises(ConfigError, match="makes every client an attacker"):
        choose_attackers(["solo"], 0.5, seed=0)
    with pytest.raises(ConfigError, match="makes every client an attacker"):
        choose_attackers(["a", "b"], 2, seed=0)


# --- label flipping ---------------------------------------------------------------------------------


def _frame(labels: list[int]) -> pd.DataFrame:
    return pd.DataFrame({"text": [f"row {index}" for index in range(len(labels))],
                         "label": pd.Series(labels, dtype="int64")})


def test_label_flip_on_ids_maps_i_to_k_minus_1_minus_i():
    frame = _frame([0, 1, 2, 3, 3, 0])
    flipped = flip_labels(frame, "label", ["a", "b", "c", "d"])
    assert flipped["label"].tolist() == [3, 2, 1, 0, 0, 3] and flipped["label"].dtype == "int64"
    assert flipped["text"].tolist() == frame["text"].tolist()
    assert frame["label"].tolist() == [0, 1, 2, 3, 3, 0]  # a copy


@pytest.mark.parametrize("k", [2, 4, 6])
def test_label_flip_is_an_involution_that_moves_every_label_when_k_is_even(k):
    labels = [f"class-{index}" for index in range(k)]
    frame = _frame([index % k for index in range(50)])
    once = flip_labels(frame, "label", labels)
    assert (once["label"] != frame["label"]).all()
    pd.testing.assert_frame_equal(flip_labels(once, "label", labels), frame)


def test_label_flip_with_odd_k_keeps_only_the_middle_label():
    frame = _frame([0, 1, 2])
    assert flip_labels(frame, "label", ["x", "y", "z"])["label"].tolist() == [2, 1, 0]


def test_label_flip_on_label_strings():
    labels = ["Business", "Sci/Tech", "Sports", "World"]
    frame = pd.DataFrame({"label": ["World", "Sports", "Business"], "n": [1, 2, 3]})
    flipped = flip_labels(frame, "label", labels)
    assert flipped["label"].tolist() == ["Business", "Sci/Tech", "World"]
    pd.testing.assert_frame_equal(flip_labels(flipped, "label", labels), frame)


def test_label_flip_refuses_what_is_not_a_label():
    with pytest.raises(DataError, match=r"label id\(s\) \[4\] outside 0..3"):
        flip_labels(_frame([0, 4]), "label", list("abcd"))
    with pytest.raises(DataError, match=r"value\(s\) \['Weather'\] that are not among the labels"):
        flip_labels(pd.DataFrame({"label": ["World", "Weather"]}), "label", ["Sports", "World"])
    with pytest.raises(DataError, match="no column 'topic'"):
        flip_labels(_frame([0]), "topic", ["a", "b"])


def test_poison_data_hook():
    assert poison_data_hook(Attack("sign-flip"), ["a", "b"]) is None
    hook = poison_data_hook(parse_attack("label-flip"), ["a", "b", "c", "d"])
    assert hook(_frame([0, 1, 2, 3]))["label"].tolist() == [3, 2, 1, 0]
    with pytest.raises(ConfigError, match="label-flip needs a classification task"):
        poison_data_hook(Attack("label-flip"), None)
