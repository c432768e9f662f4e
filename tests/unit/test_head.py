"""The classification head's rules (fedfm.head), each on a hand-computed example: the per-class mean of the
head's rows, the prototype initialization, and when each applies."""

from __future__ import annotations

import math

import pytest
import torch

from fedfm.adapters import Adapter, AdapterMeta, load_adapter, save_adapter
from fedfm.config import FederationConfig
from fedfm.errors import AdapterValidationError
from fedfm.federation import aggregate_round
from fedfm.head import COUNTS_KEY, class_counts, init_from_prototypes, per_class_aggregation, per_class_rows

FINGERPRINT = "sha256:" + "d" * 64
WEIGHT, BIAS, LORA = "classifier.weight", "classifier.bias", "layer.lora_B.weight"


def labelled(**overrides) -> FederationConfig:
    """Two tenants, three classes x, y, z."""
    cfg = FederationConfig.parse({"clients": ["a", "b"], "data": {"labels": ["x", "y", "z"]}})
    return cfg.with_overrides(overrides)


def tensors(weight, bias, lora) -> dict[str, torch.Tensor]:
    return {WEIGHT: torch.tensor(weight, dtype=torch.float32), BIAS: torch.tensor(bias, dtype=torch.float32),
            LORA: torch.tensor(lora, dtype=torch.float32)}


def write_round(tmp_path, updates: dict[str, tuple[dict, list[int]]]):
    """A global adapter of zeros and each client's update (tensors, class counts) as files."""
    global_path = tmp_path / "global.safetensors"
    save_adapter(global_path, tensors([[0.0, 0.0]] * 3, [0.0] * 3, [[0.0]]),
                 AdapterMeta(kind="global", base_model=FINGERPRINT, peft_config={}, round=0))
    pairs = []
    for client, (values, counts) in updates.items():
        meta = AdapterMeta(kind="update", base_model=FINGERPRINT, peft_config={}, round=1, samples=sum(counts),
                           client=client, metrics={COUNTS_KEY: counts})
        save_adapter(tmp_path / f"{client}.safetensors", values, meta)
        pairs.append((client, str(tmp_path / f"{client}.safetensors")))
    return str(global_path), pairs


# Tenant a holds 3 x and 1 y; tenant b holds 4 y. Nobody holds z.
A = tensors([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], [1.0, 2.0, 3.0], [[4.0]])
B = tensors([[10.0, 20.0], [30.0, 40.0], [50.0, 60.0]], [10.0, 20.0, 30.0], [[8.0]])
COUNTS_A, COUNTS_B = [3, 1, 0], [0, 4, 0]


def test_a_class_row_is_averaged_over_the_clients_that_hold_it_by_their_examples_of_it(tmp_path):
    global_uri, pairs = write_round(tmp_path, {"a": (A, COUNTS_A), "b": (B, COUNTS_B)})
    aggregate_round(labelled(), 1, global_uri, pairs, str(tmp_path / "next.safetensors"))
    result = load_adapter(tmp_path / "next.safetensors").tensors
    # x: only a holds it -> a's row. y: a holds 1, b holds 4 -> (1*a + 4*b) / 5. z: nobody -> unchanged (0).
    expected_weight = [[1.0, 2.0], [(3 + 4 * 30) / 5, (4 + 4 * 40) / 5], [0.0, 0.0]]
    expected_bias = [1.0, (2 + 4 * 20) / 5, 0.0]
    assert torch.allclose(result[WEIGHT], torch.tensor(expected_weight), atol=1e-5)
    assert torch.allclose(result[BIAS], torch.tensor(expected_bias), atol=1e-5)
    # LoRA: FedAvg by samples as always, 4 and 4 -> (4*4 + 4*8) / 8
    assert torch.allclose(result[LORA], torch.tensor([[6.0]]), atol=1e-6)


def test_with_samples_aggregation_the_rows_are_weighted_like_every_tensor(tmp_path):
    global_uri, pairs = write_round(tmp_path, {"a": (A, COUNTS_A), "b": (B, COUNTS_B)})
    aggregate_round(labelled(**{"head.aggregation": "samples"}), 1, global_uri, pairs, str(tmp_path / "n.safetensors"))
    result = load_adapter(tmp_path / "n.safetensors").tensors
    # both tenants have 4 samples: the plain mean, which halves a's row for x although only a holds x
    assert torch.allclose(result[WEIGHT], (A[WEIGHT] + B[WEIGHT]) / 2, atol=1e-6)
    assert torch.allclose(result[BIAS], (A[BIAS] + B[BIAS]) / 2, atol=1e-6)


def test_a_server_rule_on_the_mean_gets_the_per_class_mean(tmp_path):
    """FedAvgM with no momentum and a server learning rate of 2 doubles the per-class mean."""
    global_uri, pairs = write_round(tmp_path, {"a": (A, COUNTS_A), "b": (B, COUNTS_B)})
    cfg = labelled(**{"strategy.name": "fedavgm",
                      "strategy.params": {"server_learning_rate": 2.0, "server_momentum": 0.0}})
    aggregate_round(cfg, 1, global_uri, pairs, str(tmp_path / "n.safetensors"), state_out=str(tmp_path / "state"))
    result = load_adapter(tmp_path / "n.safetensors").tensors
    assert torch.allclose(result[WEIGHT][0], torch.tensor([2.0, 4.0]), atol=1e-5)
    assert torch.allclose(result[BIAS][1], torch.tensor(2 * (2 + 4 * 20) / 5), atol=1e-5)


def test_per_class_rows_rescales_so_that_the_sample_weighted_mean_is_the_per_class_mean():
    def update(client, values, counts):
        meta = AdapterMeta(kind="update", base_model=FINGERPRINT, peft_config={}, round=1, samples=sum(counts),
                           client=client, metrics={COUNTS_KEY: counts})
        return Adapter(tensors=values, meta=meta)

    counts = {"a": COUNTS_A, "b": COUNTS_B}
    out = list(per_class_rows([update("a", A, COUNTS_A), update("b", B, COUNTS_B)], counts, {"a": 4, "b": 4}, 3))
    # a's factors: (n_ac / n_a) * (N / n_c) = (3/4)(8/3), (1/4)(8/5), 0 = 2, 0.4, 0
    assert torch.allclose(out[0].tensors[BIAS], torch.tensor([1.0 * 2, 2.0 * 0.4, 0.0]))
    assert torch.allclose(out[1].tensors[BIAS], torch.tensor([0.0, 20.0 * 1.6, 0.0]))  # (4/4)(8/5) = 1.6
    assert torch.equal(out[0].tensors[LORA], A[LORA])  # only the rows of the head are rescaled


@pytest.mark.parametrize("counts, message", [
    ([3, 1], r"client a's update must carry class_counts with one count per class \(3; .*\); it has 2 values"),
    ([3, -1, 2], r"client a's class_counts must be non-negative integers"),
    ([3, 1.5, 0], r"client a's class_counts must be non-negative integers"),
    ([9, 0, 0], r"client a's class_counts sum to 9, but it reports 4 samples"),
    (None, r"client a's update must carry class_counts .* it has None"),
])
def test_bad_class_counts_fail_the_round_naming_the_client_and_nothing_is_written(tmp_path, counts, message):
    global_uri, pairs = write_round(tmp_path, {"a": (A, COUNTS_A), "b": (B, COUNTS_B)})
    meta = AdapterMeta(kind="update", base_model=FINGERPRINT, peft_config={}, round=1, samples=4, client="a",
                       metrics={} if counts is None else {COUNTS_KEY: counts})
    save_adapter(tmp_path / "a.safetensors", A, meta, overwrite=True)
    with pytest.raises(AdapterValidationError, match=message):
        aggregate_round(labelled(), 1, global_uri, pairs, str(tmp_path / "next.safetensors"))
    assert not (tmp_path / "next.safetensors").exists()


def test_under_invalid_updates_reject_bad_class_counts_reject_that_update_and_the_round_goes_on(tmp_path):
    global_uri, pairs = write_round(tmp_path, {"a": (A, COUNTS_A), "b": (B, COUNTS_B)})
    meta = AdapterMeta(kind="update", base_model=FINGERPRINT, peft_config={}, round=1, samples=4, client="a",
                       metrics={COUNTS_KEY: [4, 0, 0, 0]})  # a claims a fourth class
    save_adapter(tmp_path / "a.safetensors", A, meta, overwrite=True)
    cfg = labelled(**{"policy.invalid_updates": "reject", "policy.min_clients": 1})
    written = aggregate_round(cfg, 1, global_uri, pairs, str(tmp_path / "next.safetensors"))
    assert "rejected (policy.invalid_updates): client a's update must carry class_counts" in written.metrics["missing"]["a"]
    assert written.metrics["counted"] == ["b"]
    result = load_adapter(tmp_path / "next.safetensors").tensors
    # b alone: its row for y; x (b holds none) keeps the global's
    assert torch.allclose(result[WEIGHT], torch.tensor([[0.0, 0.0], [30.0, 40.0], [0.0, 0.0]]), atol=1e-5)


def test_the_per_class_mean_applies_only_where_the_server_sees_each_update_of_a_rule_on_the_mean():
    assert per_class_aggregation(labelled())
    assert per_class_aggregation(labelled(**{"strategy.name": "fedadam"}))
    assert not per_class_aggregation(labelled(**{"head.aggregation": "samples"}))
    assert not per_class_aggregation(labelled(**{"strategy.name": "fedmedian"}))  # a robust rule: its own rule
    assert not per_class_aggregation(labelled(**{"privacy.noise_multiplier": 1.0, "privacy.clip_norm": 1.0}))
    assert not per_class_aggregation(labelled(**{"secure_aggregation.enabled": True}))
    assert not per_class_aggregation(labelled(task="causal-lm"))


class Toy(torch.nn.Module):
    """A 'model' whose features are its input ids as 2-d vectors, and a 3-class head where PEFT puts one."""

    def __init__(self, bias: bool = True):
        super().__init__()
        head = torch.nn.Linear(2, 3, bias=bias)
        torch.nn.init.constant_(head.weight, 7.0)
        if bias:
            torch.nn.init.constant_(head.bias, 7.0)
        self.classifier = torch.nn.ModuleDict({"modules_to_save": torch.nn.ModuleDict({"default": head})})

    def forward(self, input_ids, attention_mask):
        return self.classifier["modules_to_save"]["default"](input_ids.float())

    @property
    def head(self) -> torch.nn.Linear:
        return self.classifier["modules_to_save"]["default"]


def batch(points, labels=None):
    ids = torch.tensor(points)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "labels": torch.tensor(labels if labels is not None else [0] * len(points))}


ORIGIN = batch([[0, 0]])  # the reference input; the toy's features for it are (0, 0)


def test_prototypes_set_the_rows_of_held_classes_to_the_nearest_mean_classifier():
    model = Toy()
    # class 0 at (1,0), (3,0): mean (2,0); class 1 at (0,2), (0,4): mean (0,3); class 2 absent
    counts = init_from_prototypes(model, [batch([[1, 0], [0, 2]], [0, 1]), batch([[3, 0], [0, 4]], [0, 1])], 3,
                                  reference=ORIGIN)
    assert counts == [2, 2, 0]
    # within-class variance per feature: (1+1+1+1) / (4 examples * 2 features) = 0.5; tau = 1 / (0.5 * sqrt 2)
    tau = 1 / (0.5 * math.sqrt(2))
    assert torch.allclose(model.head.weight, torch.tensor([[2 * tau, 0.0], [0.0, 3 * tau], [7.0, 7.0]]))
    assert torch.allclose(model.head.bias, torch.tensor([-tau * 4 / 2, -tau * 9 / 2, 7.0]))  # -tau |mu|^2 / 2
    # the nearest mean wins: (2.9, 0.2) is nearer (2, 0) than (0, 3)
    assert model(torch.tensor([[2.9, 0.2]]), None)[0, :2].argmax() == 0
    assert model.training  # left as it was


def test_features_far_from_the_origin_give_the_same_classifier_with_small_rows():
    """Every feature moved by (100, -50), the reference input too: the rows and biases hold only the class
    means' offsets from the reference, and the logits differ from the unshifted ones by one constant."""
    near, far = Toy(), Toy()
    points, labels = [[1, 0], [3, 0], [0, 2], [0, 4]], [0, 0, 1, 1]
    init_from_prototypes(near, [batch(points, labels)], 3, reference=ORIGIN)
    init_from_prototypes(far, [batch([[x + 100, y - 50] for x, y in points], labels)], 3,
                         reference=batch([[100, -50]]))
    assert torch.equal(far.head.weight, near.head.weight)  # τ(μ_c − m): the same offsets
    assert far.head.bias.abs().max() < 1e3
    probe = torch.tensor([[2.9, 0.2], [0.5, 3.5]])
    shift = torch.tensor([[100.0, -50.0]])
    near_logits, far_logits = near(probe, None)[:, :2], far(probe + shift, None)[:, :2]
    assert torch.allclose(torch.softmax(near_logits, 1), torch.softmax(far_logits, 1), atol=1e-4)


def test_rows_set_by_different_clients_make_the_federations_nearest_mean_classifier():
    """Client a holds classes 0 and 1, client b class 2, with the same spread; the rows each sets, put side by
    side (the per-class mean of round 1), score like the nearest-mean classifier of all the data."""
    a, b, everyone = Toy(), Toy(), Toy()
    reference = batch([[5, 5]])
    a_points, b_points = [[1, 0], [3, 0], [0, 2], [0, 4]], [[6, 6], [8, 6]]
    init_from_prototypes(a, [batch(a_points, [0, 0, 1, 1])], 3, reference=reference)
    init_from_prototypes(b, [batch(b_points, [2, 2])], 3, reference=reference)
    init_from_prototypes(everyone, [batch(a_points + b_points, [0, 0, 1, 1, 2, 2])], 3, reference=reference)
    together = Toy()
    together.head.weight.data = torch.cat([a.head.weight[:2], b.head.weight[2:]])
    together.head.bias.data = torch.cat([a.head.bias[:2], b.head.bias[2:]])
    probe = torch.tensor([[2.0, 1.0], [6.5, 5.0], [0.2, 3.0]])
    assert torch.allclose(torch.softmax(together(probe, None), 1), torch.softmax(everyone(probe, None), 1),
                          atol=1e-5)


def test_features_that_barely_vary_leave_the_head_as_it_was(capsys):
    """An untrained model's head inputs are nearly constant: their 'class means' are rounding noise, so the
    head keeps its initialization (and says why) instead of rows blown up by a huge τ."""
    model = Toy()
    points = [[1000, 1000], [1000, 1000], [1000, 1000], [1000, 1001]]  # spread 1e-3 of the size at most
    counts = init_from_prototypes(model, [batch(points, [0, 0, 1, 1])], 3, reference=ORIGIN)
    assert counts == [2, 2, 0]
    assert torch.equal(model.head.weight, torch.full((3, 2), 7.0)) and torch.equal(model.head.bias, torch.full((3,), 7.0))
    assert "vary by less than 0.001 of their size within a class" in capsys.readouterr().err


def test_without_a_bias_the_rows_have_equal_norms_and_rank_classes_by_cosine():
    model = Toy(bias=False)
    init_from_prototypes(model, [batch([[1, 0], [3, 0], [0, 2], [0, 4]], [0, 0, 1, 1])], 3, reference=ORIGIN)
    tau = 1 / (0.5 * math.sqrt(2))
    norm = (2 * tau + 3 * tau) / 2  # the mean of the two prototype rows' norms
    assert torch.allclose(model.head.weight[:2], torch.tensor([[norm, 0.0], [0.0, norm]]))


def test_class_counts_count_each_class():
    assert class_counts([0, 2, 2, 2], 4) == [1, 0, 3, 0]
