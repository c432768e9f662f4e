"""Adapter files: exact round trip, integrity, and the validation of client updates."""

from __future__ import annotations

import hashlib

import pytest
import torch

from fedfm.adapters import AdapterMeta, load_adapter, read_meta, save_adapter, validate_update
from fedfm.errors import AdapterError, AdapterValidationError

FINGERPRINT = "sha256:" + "a" * 64
PEFT = {"peft_type": "LORA", "r": 4}


def tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "base_model.model.encoder.layer.0.query.lora_A.weight": torch.randn(4, 16, generator=generator),
        "base_model.model.encoder.layer.0.query.lora_B.weight": torch.randn(16, 4, generator=generator),
        "base_model.model.classifier.bias": torch.randn(3, generator=generator),
    }


def global_meta(round_index: int = 0) -> AdapterMeta:
    return AdapterMeta(kind="global", base_model=FINGERPRINT, peft_config=PEFT, round=round_index)


def update_meta(client: str = "tenant-0", **changes) -> AdapterMeta:
    fields = dict(kind="update", base_model=FINGERPRINT, peft_config=PEFT, round=1, samples=10, client=client)
    fields.update(changes)
    return AdapterMeta(**fields)


def test_round_trip_is_exact(tmp_path):
    original = tensors()
    meta = AdapterMeta(kind="update", base_model=FINGERPRINT, peft_config=PEFT, round=3, samples=42,
                       client="tenant-7", metrics={"train_loss": 0.5})
    digest = save_adapter(tmp_path / "a.safetensors", original, meta)
    loaded = load_adapter(tmp_path / "a.safetensors")
    assert set(loaded.tensors) == set(original)
    for name, value in original.items():
        assert loaded.tensors[name].dtype == torch.float32
        assert torch.equal(loaded.tensors[name], value)
    assert loaded.meta == meta
    assert loaded.meta.sha256 == digest
    assert read_meta(tmp_path / "a.safetensors") == meta


def test_save_refuses_to_overwrite(tmp_path):
    path = tmp_path / "g.safetensors"
    save_adapter(path, tensors(0), global_meta())
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(Exception, match="already exists"):
        save_adapter(path, tensors(1), global_meta())
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    assert [p.name for p in tmp_path.iterdir()] == ["g.safetensors"]  # no temp file left behind


def test_altered_tensor_bytes_fail_the_sha256_check(tmp_path):
    path = tmp_path / "a.safetensors"
    save_adapter(path, tensors(), update_meta())
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # flip bits inside the last tensor's data
    path.write_bytes(bytes(data))
    with pytest.raises(AdapterError, match="sha256"):
        load_adapter(path, who="client tenant-0")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_unreadable_files_name_the_file(tmp_path, damage):
    path = tmp_path / "a.safetensors"
    save_adapter(path, tensors(), update_meta())
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"not a safetensors file at all",
                      "empty": b""}[damage])
    with pytest.raises(AdapterError, match="client tenant-0's adapter .*a.safetensors"):
        load_adapter(path, who="client tenant-0")


def test_a_safetensors_file_without_fedfm_header_is_rejected(tmp_path):
    from safetensors.torch import save_file

    save_file(tensors(), str(tmp_path / "plain.safetensors"))
    with pytest.raises(AdapterError, match="not a FedFM adapter"):
        load_adapter(tmp_path / "plain.safetensors")


class TestValidateUpdate:
    """Each defect has its own message, naming the client and (where there is one) the tensor."""

    def reference(self, tmp_path):
        save_adapter(tmp_path / "global.safetensors", tensors(0), global_meta())
        return load_adapter(tmp_path / "global.safetensors")

    def update(self, tmp_path, values, **meta_changes):
        save_adapter(tmp_path / "update.safetensors", values, update_meta(**meta_changes))
        return load_adapter(tmp_path / "update.safetensors")

    def test_a_good_update_passes(self, tmp_path):
        validate_update(self.update(tmp_path, tensors(1)), self.reference(tmp_path), client="tenant-0", round_index=1)

    def test_nan(self, tmp_path):
        values = tensors(1)
        values["base_model.model.classifier.bias"][1] = float("nan")
        with pytest.raises(AdapterValidationError,
                           match=r"client tenant-0's tensor base_model.model.classifier.bias has 1 non-finite value "):
            validate_update(self.update(tmp_path, values), self.reference(tmp_path), client="tenant-0", round_index=1)

    def test_wrong_shape(self, tmp_path):
        values = tensors(1)
        values["base_model.model.encoder.layer.0.query.lora_A.weight"] = torch.zeros(8, 16)
        with pytest.raises(AdapterValidationError) as raised:
            validate_update(self.update(tmp_path, values), self.reference(tmp_path), client="tenant-0", round_index=1)
        assert str(raised.value) == ("client tenant-0's tensor base_model.model.encoder.layer.0.query.lora_A.weight "
                                     "has shape (8, 16); the global adapter's is (4, 16)")
        assert raised.value.tensor == "base_model.model.encoder.layer.0.query.lora_A.weight"

    def test_missing_key(self, tmp_path):
        values = tensors(1)
        del values["base_model.model.encoder.layer.0.query.lora_B.weight"]
        with pytest.raises(AdapterValidationError,
                           match="client tenant-0's update lacks tensor base_model.model.encoder.layer.0.query.lora_B"):
            validate_update(self.update(tmp_path, values), self.reference(tmp_path), client="tenant-0", round_index=1)

    def test_extra_key(self, tmp_path):
        values = dict(tensors(1), extra=torch.zeros(2))
        with pytest.raises(AdapterValidationError,
                           match=r"has tensor extra, which it should not send \(the global adapter does not have it\)"):
            validate_update(self.update(tmp_path, values), self.reference(tmp_path), client="tenant-0", round_index=1)

    def test_other_base_model(self, tmp_path):
        other = "sha256:" + "b" * 64
        with pytest.raises(AdapterValidationError, match="client tenant-0 trained on another base model"):
            validate_update(self.update(tmp_path, tensors(1), base_model=other), self.reference(tmp_path),
                            client="tenant-0", round_index=1)

    def test_stale_round(self, tmp_path):
        with pytest.raises(AdapterValidationError, match="update for round 1, but this is round 2"):
            validate_update(self.update(tmp_path, tensors(1)), self.reference(tmp_path), client="tenant-0",
                            round_index=2)

    def test_messages_are_distinct(self, tmp_path):
        """NaN, shape, missing key and base model each get a message of their own."""
        reference = self.reference(tmp_path)
        cases = {}
        nan = tensors(1)
        nan["base_model.model.classifier.bias"][0] = float("inf")
        cases["nan"] = self.update(tmp_path / "nan", nan)
        shape = tensors(1)
        shape["base_model.model.classifier.bias"] = torch.zeros(4)
        cases["shape"] = self.update(tmp_path / "shape", shape)
        missing = tensors(1)
        missing.pop("base_model.model.classifier.bias")
        cases["missing"] = self.update(tmp_path / "missing", missing)
        cases["base"] = self.update(tmp_path / "base", tensors(1), base_model="sha256:other")
        messages = set()
        for update in cases.values():
            with pytest.raises(AdapterValidationError) as raised:
                validate_update(update, reference, client="tenant-0", round_index=1)
            messages.add(str(raised.value))
        assert len(messages) == 4
