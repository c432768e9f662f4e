"""A real client step sends its update compressed, and carries what compression left out into its next one."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load as safetensors_load

from fedfm.adapters import load_adapter, read_meta, validate_update
from fedfm.compression import kept_count
from fedfm.errors import ConfigError, StorageError
from fedfm.federation import initialize
from fedfm.training import train_client

pytestmark = pytest.mark.slow

CLIENT = "tenant-0"


def _train(cfg, tmp_path, tag: str, round_index: int = 1):
    """Train ``CLIENT`` from the same global adapter every time; the result and its update file."""
    global_path = tmp_path / "global.safetensors"
    if not global_path.exists():
        initialize(cfg, str(global_path))
    update_path = tmp_path / f"{tag}-round-{round_index}.safetensors"
    result = train_client(cfg, CLIENT, round_index, str(global_path), str(update_path))
    return result, update_path


def _header_metadata(path) -> dict[str, str]:
    data = path.read_bytes()
    return json.loads(data[8 : 8 + struct.unpack("<Q", data[:8])[0]])["__metadata__"]


def _assert_sent(method: str, sent: dict[str, torch.Tensor], wanted: dict[str, torch.Tensor]) -> None:
    """``sent`` is ``wanted`` as ``method`` encodes it: int8 within a 254th of each tensor's absmax, top-k
    exactly the largest 10 % of each tensor."""
    for name, value in wanted.items():
        if method == "int8":
            bound = float(value.abs().max()) / 254 * (1 + 1e-5)
            assert float((sent[name] - value).abs().max()) <= bound, name
        else:
            kept = sent[name] != 0
            assert int(kept.sum()) <= kept_count(value.numel(), 0.1), name  # a kept value may itself be 0
            assert torch.equal(sent[name][kept], value[kept]), name
            if not kept.all() and kept.any():
                assert float(value[~kept].abs().max()) <= float(value[kept].abs().min()), name


@pytest.mark.parametrize("method", ["int8", "topk"])
def test_a_client_sends_its_update_compressed_and_keeps_what_it_left_out(tiny_config, tmp_path, method):
    state = tmp_path / "client-state"
    plain_cfg = tiny_config()
    cfg = tiny_config(**{"compression.method": method, "compression.topk_fraction": 0.1,
                         "execution.client_state_uri": str(state)})
    _, plain_path = _train(plain_cfg, tmp_path, "plain")
    result, path = _train(cfg, tmp_path, method)

    assert json.loads(_header_metadata(path)["encoding"])["method"] == method
    assert "encoding" not in _header_metadata(plain_path)
    start, plain, update = (load_adapter(tmp_path / "global.safetensors"), load_adapter(plain_path),
                            load_adapter(path))
    assert update.meta.encoding["method"] == read_meta(path).encoding["method"] == method
    assert {name: (value.dtype, value.shape) for name, value in update.tensors.items()} == \
        {name: (torch.float32, value.shape) for name, value in start.tensors.items()}
    validate_update(update, start, client=CLIENT, round_index=1)
    _assert_sent(method, update.tensors, plain.tensors)  # the same seed trains the same update

    numel = sum(value.numel() for value in plain.tensors.values())
    assert result.bytes_raw == update.meta.metrics["bytes_raw"] == 4 * numel
    assert 0 < result.bytes_stored == update.meta.metrics["bytes_stored"] < result.bytes_raw / 3
    assert path.stat().st_size < plain_path.stat().st_size

    # what was left out waits in the client's state for its next round, and goes into that update
    residual_path = state / CLIENT / "compression-residual" / "round-0001.safetensors"
    residual = safetensors_load(residual_path.read_bytes())
    for name, value in plain.tensors.items():
        assert torch.allclose(residual[name], value - update.tensors[name], atol=1e-7), name
    assert any(value.abs().max() > 0 for value in residual.values())
    _, plain_next = _train(plain_cfg, tmp_path, "plain", round_index=2)
    _, path_next = _train(cfg, tmp_path, method, round_index=2)
    wanted = {name: value + residual[name] for name, value in load_adapter(plain_next).tensors.items()}
    _assert_sent(method, load_adapter(path_next).tensors, wanted)
    assert (state / CLIENT / "compression-residual" / "round-0002.safetensors").exists()


def test_error_feedback_without_a_state_location_fails_before_training(tiny_config, tmp_path):
    cfg = tiny_config(**{"compression.method": "int8"})
    with pytest.raises(ConfigError, match=r"client tenant-0 has nowhere to keep its residual \(compression 'int8' "
                                          r"with error feedback\): set its state_uri or execution.client_state_uri "
                                          r"\(or compression.error_feedback to false\)"):
        initialize(cfg, str(tmp_path / "global.safetensors"))  # the federation is refused before it starts
    assert not (tmp_path / "global.safetensors").exists()
    initialize(tiny_config(), str(tmp_path / "global.safetensors"))
    with pytest.raises(ConfigError, match=r"client tenant-0 keeps its compression error-feedback residual but has "
                                          r"nowhere to keep it: set its state_uri or execution.client_state_uri"):
        train_client(cfg, CLIENT, 1, str(tmp_path / "global.safetensors"), str(tmp_path / "u.safetensors"))
    assert not (tmp_path / "u.safetensors").exists()


def test_without_error_feedback_a_client_keeps_nothing(tiny_config, tmp_path):
    cfg = tiny_config(**{"compression.method": "fp16"})
    result, path = _train(cfg, tmp_path, "fp16")
    assert load_adapter(path).meta.encoding["method"] == "fp16"
    assert result.bytes_stored * 2 == result.bytes_raw
    cfg = tiny_config(**{"compression.method": "topk", "compression.error_feedback": False})
    _, path = _train(cfg, tmp_path, "topk")
    assert load_adapter(path).meta.encoding["method"] == "topk"


def test_a_retried_round_trains_again_with_error_feedback_and_keeps_the_first_residual(tiny_config, tmp_path):
    """A Job's second attempt, or a pipeline resumed at the round it was cut off in, trains the client
    again from the same global adapter: it runs (it used to refuse, the round's residual existing), sends
    the same update, and the first attempt's residual stays beside. Another start of the round is refused."""
    state = tmp_path / "client-state"
    cfg = tiny_config(**{"compression.method": "int8", "execution.client_state_uri": str(state)})
    _, first = _train(cfg, tmp_path, "first")
    folder = state / CLIENT / "compression-residual"
    first_residual = (folder / "round-0001.safetensors").read_bytes()

    _, second = _train(cfg, tmp_path, "second")
    assert load_adapter(second).tensors.keys() == load_adapter(first).tensors.keys()
    for name, value in load_adapter(first).tensors.items():
        assert torch.equal(load_adapter(second).tensors[name], value), name  # the same seed, the same update
    kept = [path for path in folder.iterdir() if path.name.startswith("round-0001.safetensors.interrupted-")]
    assert len(kept) == 1 and kept[0].read_bytes() == first_residual
    assert (folder / "round-0001.safetensors").exists()

    other_global = tmp_path / "other-global.safetensors"
    initialize(tiny_config(**{"seed": 1}), str(other_global))
    with pytest.raises(StorageError, match="residual for round 1 already exists .* from another start of the round"):
        train_client(cfg, CLIENT, 1, str(other_global), str(tmp_path / "other.safetensors"))
    assert not (tmp_path / "other.safetensors").exists()
