"""Compressed updates: error bounds per method, top-k's choice, error feedback, damaged files, and the
bytes real files take."""

from __future__ import annotations

import json
import math
import re
import struct

import pytest
import torch
from safetensors.torch import load as safetensors_load

from fedfm.adapters import AdapterMeta, load_adapter, read_meta, save_adapter
from fedfm.compression import (compress, decode_description, decompress, encode_description, kept_count, unsent,
                               with_error_feedback)
from fedfm.config import CompressionConfig, FederationConfig
from fedfm.errors import AdapterError, ConfigError, FedFMError
from fedfm.personal import load_residual, residual_uri, save_residual

FINGERPRINT = "sha256:" + "a" * 64
LORA_A = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"
HEAD = "base_model.model.classifier.weight"


def minilm_update(seed: int = 0, scale: float = 1e-3) -> dict[str, torch.Tensor]:
    """An update shaped like all-MiniLM-L6-v2's r=8 LoRA on query and value of its 6 layers, plus a 4-label
    head (the default model's: its small size makes the header count most)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(6):
        for module in ("query", "value"):
            prefix = f"base_model.model.bert.encoder.layer.{layer}.attention.self.{module}"
            tensors[f"{prefix}.lora_A.weight"] = scale * torch.randn(8, 384, generator=generator)
            tensors[f"{prefix}.lora_B.weight"] = scale * torch.randn(384, 8, generator=generator)
    tensors[HEAD] = scale * torch.randn(4, 384, generator=generator)
    return tensors


def odd_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    """Sizes that are no multiple of a block, magnitudes from 1e-7 to 1e4, and an all-zero tensor."""
    generator = torch.Generator().manual_seed(seed)
    return {
        LORA_A: torch.randn(5, 27, generator=generator),
        "tiny": 1e-7 * torch.randn(300, generator=generator),
        "large": 1e4 * torch.randn(3, 7, generator=generator),
        "zeros": torch.zeros(2, 9),
        "scalar": torch.tensor(0.25),
    }


def update_meta(**changes) -> AdapterMeta:
    fields = dict(kind="update", base_model=FINGERPRINT, peft_config={"peft_type": "LORA", "r": 8}, round=1,
                  samples=10, client="tenant-0", metrics={"train_loss": 0.5})
    fields.update(changes)
    return AdapterMeta(**fields)


def round_trip(tensors, **config):
    stored, description = compress(tensors, CompressionConfig(**config))
    return decompress(stored, description)


# --- error bounds --------------------------------------------------------------------------------


@pytest.mark.parametrize("block_size", [8, 64, 100])
def test_int8_errs_at_most_a_254th_of_each_blocks_absmax(block_size):
    original = odd_tensors()
    decoded = round_trip(original, method="int8", block_size=block_size)
    assert set(decoded) == set(original)
    for name, value in original.items():
        assert decoded[name].dtype == torch.float32 and decoded[name].shape == value.shape
        flat, error = value.reshape(-1).double(), (decoded[name] - value).reshape(-1).double().abs()
        for start in range(0, flat.numel(), block_size):  # the last block may be short
            absmax = float(flat[start : start + block_size].abs().max())
            worst = float(error[start : start + block_size].max())
            assert worst <= absmax / 254 * (1 + 1e-6), (name, start, worst, absmax)
    assert torch.equal(decoded["zeros"], original["zeros"])


def test_int8_stores_a_byte_per_value_and_two_per_block():
    stored, description = compress(odd_tensors(), CompressionConfig(method="int8", block_size=8))
    numels = [value.numel() for value in odd_tensors().values()]
    assert stored["values"].dtype == torch.int8 and stored["values"].numel() == sum(numels)
    assert stored["scales"].dtype == torch.float16 and stored["scales"].numel() == sum(math.ceil(n / 8) for n in numels)
    assert description["method"] == "int8" and description["block_size"] == 8
    json.dumps(description)  # JSON-able as it is


@pytest.mark.parametrize("method, relative", [("fp16", 2.0**-11), ("bf16", 2.0**-8)])
def test_half_precision_keeps_relative_error(method, relative):
    original = odd_tensors()
    decoded = round_trip(original, method=method)
    for name, value in original.items():
        assert decoded[name].dtype == torch.float32 and decoded[name].shape == value.shape
        error = (decoded[name] - value).abs()
        assert bool((error <= relative * value.abs() * (1 + 1e-6)).all()), (name, float(error.max()))


def test_fp16_scales_each_tensor_so_tiny_and_large_values_survive():
    """A plain fp16 cast would flush 1e-9 to zero and turn 1e6 into inf."""
    original = {"tiny": torch.full((4,), 1e-9), "large": torch.full((4,), 1e6)}
    decoded = round_trip(original, method="fp16")
    for name, value in original.items():
        assert torch.allclose(decoded[name], value, rtol=2.0**-11, atol=0), name


def test_topk_keeps_exactly_the_k_largest_magnitudes_exactly():
    original = {LORA_A: torch.randn(8, 384, generator=torch.Generator().manual_seed(1)),
                "thirty": torch.arange(30.0) - 14.5, "one": torch.tensor([-3.0])}
    decoded = round_trip(original, method="topk", topk_fraction=0.1)
    for name, value in original.items():
        kept = decoded[name] != 0
        assert int(kept.sum()) == math.ceil(0.1 * value.numel() - 1e-9), name  # 308 of 3072, 3 of 30, 1 of 1
        assert torch.equal(decoded[name][kept], value[kept])
        if not kept.all():
            assert float(value[~kept].abs().max()) <= float(value[kept].abs().min())
    assert kept_count(30, 0.1) == 3 and kept_count(30, 1.0) == 30 and kept_count(0, 0.5) == 0


def test_topk_stores_int32_indices_and_float32_values():
    stored, description = compress(minilm_update(), CompressionConfig(method="topk", topk_fraction=0.1))
    assert stored["indices"].dtype == torch.int32 and stored["values"].dtype == torch.float32
    assert stored["indices"].numel() == sum(row["kept"] for row in description["tensors"])


# --- error feedback ------------------------------------------------------------------------------


def _gaps(config: CompressionConfig, rounds: int, feedback: bool, noise: float) -> tuple[list[float], dict]:
    """‖Σ sent − Σ true updates‖ after each of ``rounds`` updates of a steady drift plus noise."""
    generator = torch.Generator().manual_seed(3)
    drift = {"a": torch.randn(16, 24, generator=generator), "b": torch.randn(40, generator=generator)}
    residual: dict[str, torch.Tensor] = {}
    gap = {name: torch.zeros_like(value) for name, value in drift.items()}
    gaps = []
    for _ in range(rounds):
        update = {name: value + noise * torch.randn(value.shape, generator=generator) for name, value in drift.items()}
        wanted = with_error_feedback(update, residual) if feedback else update
        sent = decompress(*compress(wanted, config))
        if feedback:
            residual = unsent(wanted, sent)
        for name in gap:
            gap[name] += sent[name] - update[name]
        gaps.append(math.sqrt(sum(float(value.double().pow(2).sum()) for value in gap.values())))
    return gaps, {"gap": gap, "residual": residual}


@pytest.mark.parametrize("config, noise", [(CompressionConfig(method="topk", topk_fraction=0.1), 0.3),
                                           (CompressionConfig(method="int8", block_size=16), 0.001)],
                         ids=["topk", "int8"])
def test_error_feedback_keeps_what_was_sent_on_track(config, noise):
    with_feedback, state = _gaps(config, 200, True, noise)
    without, _ = _gaps(config, 200, False, noise)
    # with feedback the gap is exactly the residual still held back, and it stops growing
    for name, gap in state["gap"].items():
        assert torch.allclose(gap, -state["residual"][name], atol=1e-3), name
    assert with_feedback[-1] <= 1.2 * max(with_feedback[:50]), with_feedback[::25]
    # without, what compression drops adds up round after round
    assert without[-1] >= 3 * without[49], without[::25]
    assert without[-1] >= 10 * with_feedback[-1], (without[-1], with_feedback[-1])


def test_a_residual_that_does_not_fit_the_update_is_refused():
    update = {"a": torch.zeros(2, 3)}
    assert torch.equal(with_error_feedback(update, {})["a"], update["a"])
    with pytest.raises(AdapterError, match=r"tensor a of shape \(3, 2\); the update's is \(2, 3\)"):
        with_error_feedback(update, {"a": torch.zeros(3, 2)})
    with pytest.raises(AdapterError, match="has tensor b, which the update does not"):
        with_error_feedback(update, {"b": torch.zeros(1)})


def test_residuals_are_kept_per_round_and_never_overwritten(tmp_path):
    cfg = FederationConfig.parse({"clients": 2, "execution": {"client_state_uri": str(tmp_path)}})
    assert load_residual(cfg, "tenant-0", 1, started_from="g1") == {}  # nothing left out before the first round
    save_residual(cfg, "tenant-0", 1, {"a": torch.ones(2)}, started_from="g1")
    assert residual_uri(cfg, "tenant-0", 1) == f"{tmp_path}/tenant-0/compression-residual/round-0001.safetensors"
    assert torch.equal(load_residual(cfg, "tenant-0", 2, started_from="g2")["a"], torch.ones(2))
    assert torch.equal(load_residual(cfg, "tenant-0", 4, started_from="g4")["a"], torch.ones(2))  # not drawn in 2-3
    assert load_residual(cfg, "tenant-1", 2, started_from="g2") == {}
    with pytest.raises(FedFMError, match="already exists"):
        save_residual(cfg, "tenant-0", 1, {"a": torch.zeros(2)}, started_from="another run's g1")
    with pytest.raises(FedFMError, match="residual for round 1 already exists .* from another start of the round"):
        load_residual(cfg, "tenant-0", 1, started_from="another run's g1")  # before training: fails fast
    assert sorted(path.name for path in (tmp_path / "tenant-0" / "compression-residual").iterdir()) == [
        "round-0001.safetensors"]


def test_a_second_attempt_at_a_round_keeps_the_first_residual_beside_and_writes_its_own(tmp_path):
    """A Job's retry, or a run resumed at the round it was cut off in, trains the round again from the
    same global adapter: the first attempt's residual is not in its way, and is not lost either."""
    cfg = FederationConfig.parse({"clients": 2, "execution": {"client_state_uri": str(tmp_path)}})
    folder = tmp_path / "tenant-0" / "compression-residual"
    save_residual(cfg, "tenant-0", 1, {"a": torch.ones(2)}, started_from="g1")
    first = (folder / "round-0001.safetensors").read_bytes()
    save_residual(cfg, "tenant-0", 2, {"a": torch.full((2,), 2.0)}, started_from="g2")  # cut off after this

    assert torch.equal(load_residual(cfg, "tenant-0", 2, started_from="g2")["a"], torch.ones(2))  # round 1's
    save_residual(cfg, "tenant-0", 2, {"a": torch.full((2,), 3.0)}, started_from="g2")
    kept = [path for path in folder.iterdir() if path.name.startswith("round-0002.safetensors.interrupted-")]
    assert len(kept) == 1 and safetensors_load(kept[0].read_bytes())["a"].tolist() == [2.0, 2.0]
    assert torch.equal(load_residual(cfg, "tenant-0", 3, started_from="g3")["a"], torch.full((2,), 3.0))
    assert (folder / "round-0001.safetensors").read_bytes() == first  # an earlier round is never touched
    with pytest.raises(FedFMError, match="already exists"):  # an earlier round is not an attempt at this one
        save_residual(cfg, "tenant-0", 1, {"a": torch.zeros(2)}, started_from="g2")
    save_residual(cfg, "tenant-0", 2, {"a": torch.full((2,), 4.0)}, started_from="g2")  # a third: a second copy
    assert len([path for path in folder.iterdir() if ".interrupted-" in path.name]) == 2


def test_error_feedback_without_a_state_location_names_the_settings():
    cfg = FederationConfig.parse({"clients": 2})
    with pytest.raises(ConfigError, match=r"client tenant-0 keeps its compression error-feedback residual but has "
                                          r"nowhere to keep it: set its state_uri or execution.client_state_uri "
                                          r"\(or set compression.error_feedback to false\)"):
        load_residual(cfg, "tenant-0", 1, started_from="g1")


# --- damaged descriptions and files --------------------------------------------------------------


def _spoil(method: str, change):
    stored, description = compress(odd_tensors(), CompressionConfig(method=method, block_size=8))
    change(stored, description)
    return stored, description


def _row(description, name):
    return next(row for row in description["tensors"] if row["name"] == name)


@pytest.mark.parametrize("method, change, message", [
    ("int8", lambda s, d: d.update(method="zip"), "unknown encoding method 'zip'"),
    # the stored tensors are packed in the description's (sorted) order: the tensor that overruns is named
    ("int8", lambda s, d: _row(d, "zeros").update(shape=[2, 10]), "tensor zeros needs values[457:477], but only 475"),
    ("int8", lambda s, d: _row(d, "zeros").update(shape=[2, 8]), "2 stored values belong to no tensor"),
    ("int8", lambda s, d: _row(d, LORA_A).update(shape="5x27"), f"tensor {LORA_A} has shape '5x27'"),
    ("int8", lambda s, d: _row(d, LORA_A).update(shape=[5, -27]), f"tensor {LORA_A} has shape"),
    ("int8", lambda s, d: _row(d, LORA_A).update(exponent="big"), f"tensor {LORA_A} has exponent 'big'"),
    ("int8", lambda s, d: _row(d, LORA_A).pop("exponent"), f"tensor {LORA_A} has exponent None"),
    ("int8", lambda s, d: d.update(block_size=0), "block_size 0"),
    ("int8", lambda s, d: d["tensors"].append(dict(d["tensors"][0])), "appears twice"),
    ("int8", lambda s, d: d["tensors"].append({"shape": [1]}), "entry 5 of its encoding names no tensor"),
    ("int8", lambda s, d: s.update(scales=s["scales"].float()), "stored tensor scales is float32"),
    ("int8", lambda s, d: s.pop("scales"), "stored tensor scales of its int8 encoding is missing"),
    ("int8", lambda s, d: s.update(extra=torch.zeros(1)), "stored tensor extra is not part of the int8 encoding"),
    ("fp16", lambda s, d: s.update(values=s["values"].reshape(1, -1)), "the fp16 encoding stores it flat"),
    ("bf16", lambda s, d: s.update(values=s["values"][:-1]), "tensor zeros needs values[457:475], but only 474"),
    ("topk", lambda s, d: _row(d, LORA_A).update(kept=1000), f"tensor {LORA_A} has kept 1000"),
    ("topk", lambda s, d: s["indices"].__setitem__(0, 135), f"tensor {LORA_A} has stored indices outside 0..134"),
    ("topk", lambda s, d: s["indices"].__setitem__(1, int(s["indices"][0])),
     f"tensor {LORA_A} has a stored index twice"),
])
def test_a_description_that_does_not_fit_its_data_names_the_tensor(method, change, message):
    stored, description = _spoil(method, change)
    with pytest.raises(AdapterError, match=f"update u: .*{re.escape(message)}"):
        decompress(stored, description, where="update u")


def _header(path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def _rewrite(path, header: dict, body: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + body)


@pytest.mark.parametrize("damage, message", [
    (lambda e: "not json", "damaged encoding header"),
    (lambda e: json.dumps({**json.loads(e), "tensors": "!!!"}), "damaged encoding header"),
    (lambda e: json.dumps({**json.loads(e), "tensors": "eJzLSM3JyQcABiwCFQ=="}), "damaged encoding header"),
    (lambda e: json.dumps({**json.loads(e), "method": "gzip"}), "unknown encoding method 'gzip'"),
])
def test_a_damaged_encoding_header_is_an_adapter_error(tmp_path, damage, message):
    path = tmp_path / "u.safetensors"
    save_adapter(path, odd_tensors(), update_meta(), compression=CompressionConfig(method="int8"))
    header, body = _header(path)
    header["__metadata__"]["encoding"] = damage(header["__metadata__"]["encoding"])
    _rewrite(path, header, body)
    with pytest.raises(AdapterError, match=f"{re.escape(str(path))}.*{message}"):
        load_adapter(path)


def test_the_sha256_covers_the_stored_tensors(tmp_path):
    path = tmp_path / "u.safetensors"
    save_adapter(path, odd_tensors(), update_meta(), compression=CompressionConfig(method="int8"))
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # one bit of the stored tensors
    path.write_bytes(bytes(data))
    with pytest.raises(AdapterError, match="fails its sha256 check"):
        load_adapter(path)


def test_the_header_describes_the_encoding_in_a_few_hundred_bytes():
    _, description = compress(minilm_update(), CompressionConfig(method="int8"))
    text = encode_description(description)
    assert len(text) < 600, len(text)
    assert json.loads(text)["method"] == "int8"
    assert decode_description(text, "here") == description


# --- adapter files -------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["fp16", "bf16", "int8", "topk"])
def test_compressed_updates_load_as_float32_under_their_names(tmp_path, method):
    original, meta = odd_tensors(), update_meta()
    digest = save_adapter(tmp_path / "u.safetensors", original, meta, compression=CompressionConfig(method=method))
    loaded = load_adapter(tmp_path / "u.safetensors")
    assert loaded.meta == meta and loaded.meta.sha256 == digest
    assert loaded.meta.encoding["method"] == method and read_meta(tmp_path / "u.safetensors").encoding == meta.encoding
    assert {name: (value.dtype, value.shape) for name, value in loaded.tensors.items()} == \
        {name: (torch.float32, value.shape) for name, value in original.items()}
    expected = round_trip(original, method=method)
    assert all(torch.equal(loaded.tensors[name], expected[name]) for name in original)


def test_uncompressed_files_carry_no_encoding(tmp_path):
    save_adapter(tmp_path / "u.safetensors", odd_tensors(), update_meta(), compression=CompressionConfig())
    header, _ = _header(tmp_path / "u.safetensors")
    assert "encoding" not in header["__metadata__"]
    assert load_adapter(tmp_path / "u.safetensors").meta.encoding is None


def test_global_adapters_are_never_compressed(tmp_path):
    with pytest.raises(ValueError, match="only updates are stored compressed"):
        save_adapter(tmp_path / "g.safetensors", odd_tensors(), update_meta(kind="global", client=None, samples=0),
                     compression=CompressionConfig(method="int8"))


def test_non_finite_values_cannot_be_compressed():
    with pytest.raises(AdapterError, match=f"cannot compress tensor {HEAD}: it has 1 non-finite value"):
        compress({HEAD: torch.tensor([1.0, float("nan")])}, CompressionConfig(method="int8"))


def test_update_files_shrink_by_method(tmp_path):
    """Sizes of real files written through save_adapter, headers included, for a MiniLM-sized LoRA update."""
    update = minilm_update()
    save_adapter(tmp_path / "float32.safetensors", update, update_meta())
    plain = (tmp_path / "float32.safetensors").stat().st_size
    ratios = {}
    for method in ("fp16", "bf16", "int8", "topk"):
        path = tmp_path / f"{method}.safetensors"
        save_adapter(path, update, update_meta(), compression=CompressionConfig(method=method, topk_fraction=0.1))
        ratios[method] = path.stat().st_size / plain
    report = f"file size / float32 file ({plain} bytes): " + ", ".join(f"{m} {r:.4f}" for m, r in ratios.items())
    assert ratios["int8"] <= 0.26, report
    assert 0.48 <= ratios["fp16"] <= 0.52 and 0.48 <= ratios["bf16"] <= 0.52, report
    assert ratios["topk"] <= 0.21, report  # 10 % of the values, each with a 4-byte index
