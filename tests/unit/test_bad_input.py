"""Bad input everywhere (issue 7): random and corrupted adapters, server states, client state files,
configs and CSVs, fed to the loaders and validators the way a run reads them.

Every call must either succeed, and then only on input that really is valid, or raise a
:class:`~fedfm.errors.FedFMError` subclass with a message; any other exception (a traceback from inside
torch, safetensors, pandas, json, yaml or pydantic) fails the test with the example that caused it.
Every example runs inside a run directory that also holds a run's usual files, and no file or folder
there may be created, modified or deleted by a loader (the inputs themselves included).

The examples are derandomized, so CI sees the same ones every time.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import hashlib
import io
import json
import math
import os
import struct
import tempfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from fedfm import storage
from fedfm.adapters import (FORMAT, Adapter, AdapterMeta, content_sha256, load_adapter, read_meta, save_adapter,
                            validate_update)
from fedfm.compression import encode_description
from fedfm.config import MAX_CLIENTS, CompressionConfig, FederationConfig, load_config
from fedfm.data import describe_clients, load_client_data, resolve_labels
from fedfm.errors import AdapterError, ConfigError, DataError, FedFMError, StorageError
from fedfm.personal import load_personal, load_residual
from fedfm.server_state import SERVER_STATE_FORMAT, load_server_state, save_server_state

FINGERPRINT = "sha256:" + "b" * 64
PEFT = {"peft_type": "LORA", "r": 2}
A = "base_model.model.encoder.layer.0.query.lora_A.weight"
B = "base_model.model.encoder.layer.0.query.lora_B.weight"
HEAD = "base_model.model.classifier.bias"
SHAPES = {A: (2, 6), B: (6, 2), HEAD: (3,)}
CLIENT = "tenant-0"
STRATEGY = "fedadam"


def fuzz(examples: int):
    """Seeded settings: the same examples on every run, no example database written anywhere."""
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None, print_blob=False,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large, HealthCheck.filter_too_much])


def tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=generator) for name, shape in SHAPES.items()}


def update_meta(**changes) -> AdapterMeta:
    fields = dict(kind="update", base_model=FINGERPRINT, peft_config=PEFT, round=1, samples=10, client=CLIENT,
                  metrics={"train_loss": 0.5})
    fields.update(changes)
    return AdapterMeta(**fields)


def global_meta() -> AdapterMeta:
    return AdapterMeta(kind="global", base_model=FINGERPRINT, peft_config=PEFT, round=0)


# --------------------------------------------------------------------------------------------------
# The run directory and the contract
# --------------------------------------------------------------------------------------------------


class RunDir:
    """A run's directory with its usual files; :meth:`unchanged` asserts that nothing in it changes."""

    def __init__(self, root: Path):
        self.root = root
        self.inputs = root / "inputs"
        self.inputs.mkdir(parents=True)
        self.global_uri = str(root / "work" / "round-0000" / "global.safetensors")
        save_adapter(self.global_uri, tensors(0), global_meta())
        self.global_adapter = load_adapter(self.global_uri)
        save_server_state(str(root / "work" / "round-0001" / "server-state.safetensors"), STRATEGY, 1,
                          {"step": 1, f"m.{A}": torch.zeros(SHAPES[A])})
        (root / "history.json").write_text(json.dumps([{"round": 0, "eval": {"accuracy": 0.25}}]))
        (root / "metrics.json").write_text(json.dumps({"config": FederationConfig().as_dict()}))
        (root / "data.csv").write_text("text,label\nhello,0\nworld,1\n")

    def put(self, name: str, data: bytes | str) -> str:
        """Write an input file (before the snapshot); its path."""
        path = self.inputs / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return str(path)

    def snapshot(self) -> dict[str, tuple[str, int]]:
        entries = {}
        for path in sorted(self.root.rglob("*")):
            stat = path.lstat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "directory"
            entries[str(path.relative_to(self.root))] = (digest, stat.st_mtime_ns)
        return entries

    @contextlib.contextmanager
    def unchanged(self) -> Iterator[None]:
        before = self.snapshot()
        try:
            yield
        finally:
            after = self.snapshot()
            created = sorted(set(after) - set(before))
            deleted = sorted(set(before) - set(after))
            modified = sorted(name for name in set(before) & set(after) if before[name] != after[name])
            assert not (created or deleted or modified), (
                f"a loader touched the run directory: created {created}, deleted {deleted}, modified {modified}")


@pytest.fixture
def run_dir(tmp_path) -> RunDir:
    return RunDir(tmp_path / "run")


def outcome(call: Callable[[], Any]) -> Any:
    """``call()``'s result, or the FedFMError it raised (with a message). Anything else propagates and fails
    the test."""
    try:
        result = call()
    except FedFMError as exc:
        assert str(exc).strip(), f"{type(exc).__name__} without a message"
        event(f"raised {type(exc).__name__}")
        return exc
    event("succeeded")
    return result


def names_any(message: str, *inputs: str) -> bool:
    return any(text and text in message for text in inputs)



# --------------------------------------------------------------------------------------------------
# Adapters
# --------------------------------------------------------------------------------------------------


def _valid_update_bytes(method: str) -> bytes:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "u.safetensors"
        compression = None if method == "none" else CompressionConfig(method=method, block_size=8,
                                                                       topk_fraction=0.3)
        save_adapter(path, tensors(1), update_meta(), compression=compression)
        return path.read_bytes()


VALID_UPDATES = {method: _valid_update_bytes(method) for method in ("none", "fp16", "bf16", "int8", "topk")}


def raw_file(header: Any, body: bytes = b"") -> bytes:
    """A safetensors-like file: the 8-byte header length, any JSON header, any body."""
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


def split_file(data: bytes) -> tuple[dict[str, Any], bytes]:
    length = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + length]), data[8 + length :]


json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(json_scalars, lambda children: st.lists(children, max_size=4)
                           | st.dictionaries(st.text(max_size=10), children, max_size=4), max_leaves=12)


@st.composite
def corrupted_bytes(draw, data: bytes) -> bytes:
    """``data`` truncated, with bytes flipped, spliced or appended, or replaced by random bytes."""
    how = draw(st.sampled_from(["truncate", "flip", "splice", "append", "random", "empty", "header-length"]))
    if how == "truncate":
        return data[: draw(st.integers(0, len(data) - 1))]
    if how == "flip":
        damaged = bytearray(data)
        for position, mask in draw(st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(1, 255)),
                                            min_size=1, max_size=8)):
            damaged[position] ^= mask
        return bytes(damaged)
    if how == "splice":
        start = draw(st.integers(0, len(data)))
        end = draw(st.integers(start, min(len(data), start + 64)))
        return data[:start] + draw(st.binary(max_size=64)) + data[end:]
    if how == "append":
        return data + draw(st.binary(min_size=1, max_size=64))
    if how == "random":
        return draw(st.binary(max_size=256))
    if how == "empty":
        return b""
    length = draw(st.sampled_from([0, 1, 7, len(data), 2**31, 2**63, 2**64 - 1]) | st.integers(0, 2**64 - 1))
    return struct.pack("<Q", length) + data[8:]


@st.composite
def header_fields(draw) -> dict[str, str]:
    """A FedFM header with some fields deleted, replaced by random text or JSON, or added."""
    header = update_meta().to_header()
    for key in draw(st.lists(st.sampled_from(sorted(header) + ["encoding", "client"]), max_size=3, unique=True)):
        header[key] = draw(st.one_of(
            st.text(max_size=30),
            json_values.map(json.dumps),
            st.sampled_from(["", "-1", "1.5", "1e400", "NaN", " 1", "١", "global", "update", "[" * 2000,
                             FORMAT, "9" * 5000]),
        ))
    for key in draw(st.lists(st.sampled_from(sorted(header)), max_size=2, unique=True)):
        header.pop(key, None)
    header.update(draw(st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=2)))
    return header


@st.composite
def altered_tensors(draw) -> dict[str, torch.Tensor]:
    """The update's tensors with a key missing, extra or renamed, a wrong shape or dtype, or NaN/inf."""
    values = tensors(1)
    for change in draw(st.lists(st.sampled_from(["drop", "extra", "rename", "shape", "dtype", "nonfinite",
                                                 "scalar", "empty"]), min_size=1, max_size=3)):
        name = draw(st.sampled_from(sorted(values))) if values else None
        if change == "drop" and name:
            del values[name]
        elif change == "extra":
            values[draw(st.sampled_from([HEAD + "2", "lora_C", "", "x" * 200]))] = torch.zeros(2)
        elif change == "rename" and name:
            values[name.replace("lora", "lorb")] = values.pop(name)
        elif change == "shape" and name:
            values[name] = torch.zeros(draw(st.lists(st.integers(0, 5), max_size=3)))
        elif change == "dtype" and name:
            dtype = draw(st.sampled_from([torch.int32, torch.int64, torch.float16, torch.bfloat16, torch.float64,
                                          torch.uint8, torch.bool, torch.int8]))
            values[name] = values[name].to(dtype)
        elif change == "nonfinite" and name and values[name].numel() and values[name].is_floating_point():
            flat = values[name].reshape(-1).clone()
            flat[draw(st.integers(0, flat.numel() - 1))] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
            values[name] = flat.reshape(values[name].shape)
        elif change == "scalar" and name:
            values[name] = torch.tensor(1.0)
        elif change == "empty":
            values = {}
    return values


@st.composite
def encodings(draw) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Stored tensors and an encoding description: a real one with fields changed, or random ones."""
    method = draw(st.sampled_from(["fp16", "bf16", "int8", "topk"]))
    header, _ = split_file(VALID_UPDATES[method])
    stored = safetensors_load(VALID_UPDATES[method])
    description = json.loads(header["__metadata__"]["encoding"])
    rows = json.loads(zlib.decompress(base64.b64decode(description["tensors"])))
    description["tensors"] = rows
    for _ in range(draw(st.integers(1, 3))):
        target = draw(st.sampled_from(["description", "row", "rows", "stored"]))
        if target == "description":
            key = draw(st.sampled_from(["method", "block_size", "fraction", "tensors", "other"]))
            description[key] = draw(json_values | st.sampled_from(
                [0, -1, 2**40, 2**64, 1e-300, 5e-324, 0.5, 1, 1.0, 2, "int8", "topk", "fp16", "bf16", True]))
        elif target == "row" and any(isinstance(row, dict) for row in rows):
            # a row: one of the description's objects (an earlier "rows" change may have added other values)
            row = draw(st.sampled_from([row for row in rows if isinstance(row, dict)]))
            key = draw(st.sampled_from(["name", "shape", "exponent", "kept", "other"]))
            row[key] = draw(json_values | st.sampled_from(
                [[2**20, 2**20], [10**30], [0], [], [-1], [True], [2, 6], [6, 2], [3], [1.5], 0, -300, 301,
                 2**40, 4, 12, A, B, HEAD]))
        elif target == "rows":
            if rows and draw(st.booleans()):
                rows.pop(draw(st.integers(0, len(rows) - 1)))
            else:
                rows.append(draw(json_values))
        else:
            name = draw(st.sampled_from(sorted(stored) + ["extra"]))
            dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.int32,
                                          torch.int64, torch.uint8]))
            size = draw(st.integers(0, 80))
            values = torch.tensor(draw(st.lists(st.integers(-2**31, 2**31 - 1), min_size=size, max_size=size)),
                                  dtype=torch.int64)
            stored[name] = values.to(dtype) if draw(st.booleans()) else values.to(dtype).reshape(1, -1)
    return stored, description


def adapter_file(tensor_values: dict[str, torch.Tensor], header: dict[str, str], *, fix_sha256: bool) -> bytes:
    if fix_sha256:
        header = {**header, "sha256": content_sha256(tensor_values)}
    return safetensors_save({name: value.contiguous() for name, value in tensor_values.items()}, metadata=header)


@st.composite
def adapter_inputs(draw) -> bytes:
    """Bytes that should be an update of round 1 from tenant-0, in every way they can be wrong (or right)."""
    kind = draw(st.sampled_from(["bytes", "header", "tensors", "encoding", "raw-header", "valid"]))
    if kind == "bytes":
        return draw(corrupted_bytes(VALID_UPDATES[draw(st.sampled_from(sorted(VALID_UPDATES)))]))
    if kind == "header":
        return adapter_file(tensors(1), draw(header_fields()), fix_sha256=draw(st.booleans()))
    if kind == "tensors":
        return adapter_file(draw(altered_tensors()), update_meta().to_header(), fix_sha256=draw(st.booleans()))
    if kind == "encoding":
        stored, description = draw(encodings())
        try:
            encoded = encode_description(description)
        except (TypeError, ValueError, KeyError):  # a description that cannot even be written: write it raw
            encoded = json.dumps(description, default=str)
        header = {**update_meta().to_header(), "encoding": encoded}
        return adapter_file(stored, header, fix_sha256=True)
    if kind == "raw-header":
        header = draw(st.one_of(
            json_values,
            st.fixed_dictionaries({"__metadata__": json_values | st.just(update_meta().to_header())},
                                  optional={A: st.fixed_dictionaries({
                                      "dtype": st.sampled_from(["F32", "F16", "I32", "BOOL", "F64", "X"])
                                      | st.text(max_size=4),
                                      "shape": st.lists(st.integers(-1, 2**40), max_size=3),
                                      "data_offsets": st.lists(st.integers(-1, 2**40), max_size=3)})}),
        ))
        return raw_file(header, draw(st.binary(max_size=64)))
    return VALID_UPDATES[draw(st.sampled_from(sorted(VALID_UPDATES)))]


def check_update(run: RunDir, data: bytes) -> None:
    path = run.put("update.safetensors", data)
    with run.unchanged():
        loaded = outcome(lambda: load_adapter(path, who=f"client {CLIENT}"))
        meta = outcome(lambda: read_meta(path))
    for result in (loaded, meta):
        if isinstance(result, FedFMError):
            assert isinstance(result, AdapterError), result
            assert path in str(result), f"the message does not name the file: {result}"
    if isinstance(loaded, Adapter):
        assert all(value.dtype == torch.float32 for value in loaded.tensors.values())
        assert loaded.meta.kind in ("global", "update")
        assert isinstance(loaded.meta.peft_config, dict) and isinstance(loaded.meta.metrics, dict)
        assert isinstance(meta, AdapterMeta), f"load_adapter accepted what read_meta refused: {meta}"
        with run.unchanged():
            verdict = outcome(lambda: validate_update(loaded, run.global_adapter, client=CLIENT, round_index=1))
        if isinstance(verdict, FedFMError):
            assert CLIENT in str(verdict), verdict
        else:  # accepted: it must really be a finite round-1 update with the global adapter's tensors
            assert loaded.meta.kind == "update" and loaded.meta.round == 1 and loaded.meta.samples > 0
            assert loaded.meta.base_model == FINGERPRINT
            assert {name: tuple(value.shape) for name, value in loaded.tensors.items()} == SHAPES
            assert all(bool(torch.isfinite(value).all()) for value in loaded.tensors.values())


@fuzz(500)
@given(data=adapter_inputs())
def test_adapter_files_load_or_fail_with_an_adapter_error(run_dir, data):
    check_update(run_dir, data)


@pytest.mark.parametrize("method", sorted(VALID_UPDATES))
def test_every_valid_update_loads_and_validates(run_dir, method):
    path = run_dir.put("update.safetensors", VALID_UPDATES[method])
    with run_dir.unchanged():
        update = load_adapter(path)
        validate_update(update, run_dir.global_adapter, client=CLIENT, round_index=1)
        assert read_meta(path).kind == "update"


@fuzz(60)
@given(data=st.binary(max_size=512), name=st.sampled_from(["u.safetensors", "u", "u.json", "dir/u.safetensors"]))
def test_random_bytes_are_never_an_adapter(run_dir, data, name):
    path = run_dir.put(name, data)
    with run_dir.unchanged():
        for result in (outcome(lambda: load_adapter(path)), outcome(lambda: read_meta(path))):
            assert isinstance(result, AdapterError) and path in str(result), result


def test_missing_adapter_and_directory_name_the_path(run_dir):
    for path in (str(run_dir.inputs / "nothing.safetensors"), str(run_dir.inputs)):
        with run_dir.unchanged():
            for call in (load_adapter, read_meta):
                with pytest.raises(AdapterError) as info:
                    call(path)
                assert path in str(info.value)


def test_a_plain_file_of_another_dtype_is_refused_naming_the_tensor(run_dir):
    values = {**tensors(1), A: tensors(1)[A].to(torch.int32)}
    path = run_dir.put("u.safetensors", adapter_file(values, update_meta().to_header(), fix_sha256=True))
    with run_dir.unchanged(), pytest.raises(AdapterError, match=f"{A} is int32.*float32"):
        load_adapter(path)


def test_a_topk_encoding_cannot_claim_a_huge_tensor(run_dir):
    stored = {"indices": torch.zeros(0, dtype=torch.int32), "values": torch.zeros(0)}
    for fraction, kept in ((0.1, 0), (5e-324, 1)):
        encoding = encode_description({"method": "topk", "fraction": fraction,
                                       "tensors": [{"name": A, "shape": [2**20, 2**20], "kept": kept}]})
        if kept:
            stored = {"indices": torch.zeros(1, dtype=torch.int32), "values": torch.zeros(1)}
        path = run_dir.put("u.safetensors", adapter_file(stored, {**update_meta().to_header(), "encoding": encoding},
                                                         fix_sha256=True))
        with run_dir.unchanged(), pytest.raises(AdapterError, match=A):
            load_adapter(path)


def test_an_int8_encoding_with_a_huge_block_decodes_without_blowing_up(run_dir):
    stored = {"values": torch.ones(3, dtype=torch.int8), "scales": torch.ones(1, dtype=torch.float16)}
    encoding = encode_description({"method": "int8", "block_size": 2**40,
                                   "tensors": [{"name": HEAD, "shape": [3], "exponent": 0}]})
    path = run_dir.put("u.safetensors", adapter_file(stored, {**update_meta().to_header(), "encoding": encoding},
                                                     fix_sha256=True))
    with run_dir.unchanged():
        assert torch.equal(load_adapter(path).tensors[HEAD], torch.ones(3))


@pytest.mark.parametrize("field, value, message", [
    ("kind", "delta", "kind 'delta'"),
    ("round", "-1", "field 'round'"),
    ("samples", "1e3", "field 'samples'"),
    ("peft_config", "[1]", "field 'peft_config' is a JSON list"),
    ("metrics", "[" * 5000, "field 'metrics' nests too deeply"),
    ("metrics", "null", "field 'metrics' is a JSON NoneType"),
])
def test_a_damaged_header_field_is_named(run_dir, field, value, message):
    header = {**update_meta().to_header(), field: value}
    path = run_dir.put("u.safetensors", adapter_file(tensors(1), header, fix_sha256=True))
    with run_dir.unchanged():
        for call in (load_adapter, read_meta):
            with pytest.raises(AdapterError, match="damaged FedFM header") as info:
                call(path)
            assert message in str(info.value) and path in str(info.value)


# --------------------------------------------------------------------------------------------------
# Server state and client state files
# --------------------------------------------------------------------------------------------------


def _valid_server_state() -> bytes:
    with tempfile.TemporaryDirectory() as directory:
        path = str(Path(directory) / "s.safetensors")
        save_server_state(path, STRATEGY, 2, {"step": 2, f"m.{A}": torch.ones(SHAPES[A]),
                                              f"v.{A}": torch.ones(SHAPES[A])})
        return Path(path).read_bytes()


VALID_SERVER_STATE = _valid_server_state()


@st.composite
def server_state_inputs(draw) -> bytes:
    kind = draw(st.sampled_from(["bytes", "header", "raw-header", "valid"]))
    if kind == "bytes":
        return draw(corrupted_bytes(VALID_SERVER_STATE))
    if kind == "header":
        header, _ = split_file(VALID_SERVER_STATE)
        metadata = dict(header["__metadata__"])
        for key in draw(st.lists(st.sampled_from(["format", "strategy", "round", "numbers", "other"]), min_size=1,
                                 max_size=3, unique=True)):
            if draw(st.booleans()):
                metadata.pop(key, None)
            else:
                metadata[key] = draw(st.text(max_size=20) | json_values.map(json.dumps)
                                     | st.sampled_from(["[" * 3000, "fedavg", SERVER_STATE_FORMAT]))
        return safetensors_save({f"m.{A}": torch.ones(SHAPES[A])}, metadata=metadata)
    if kind == "raw-header":
        return raw_file(draw(json_values), draw(st.binary(max_size=32)))
    return VALID_SERVER_STATE


@fuzz(250)
@given(data=server_state_inputs())
def test_server_states_load_or_fail_with_a_fedfm_error(run_dir, data):
    path = run_dir.put("server-state.safetensors", data)
    with run_dir.unchanged():
        result = outcome(lambda: load_server_state(path, STRATEGY))
    if isinstance(result, FedFMError):
        assert path in str(result), result
    elif result is not None:
        assert isinstance(result, dict), result
        if data == VALID_SERVER_STATE:
            assert result["step"] == 2 and torch.equal(result[f"m.{A}"], torch.ones(SHAPES[A])), result


@fuzz(80)
@given(data=st.one_of(corrupted_bytes(safetensors_save({B: torch.ones(6, 2)}, metadata={"client": "a"})),
                      st.builds(lambda dtype: safetensors_save({B: torch.ones(6, 2, dtype=dtype)}),
                                st.sampled_from([torch.float16, torch.int32, torch.bool, torch.float64]))),
       which=st.sampled_from(["personal", "residual"]))
def test_client_state_files_load_or_fail_with_a_fedfm_error(run_dir, data, which):
    cfg = FederationConfig(clients=["a"], execution={"client_state_uri": str(run_dir.inputs / "state")})
    if which == "personal":
        path = run_dir.put("state/a/round-0001.safetensors", data)
        call = lambda: load_personal(cfg, "a", 1)  # noqa: E731
    else:
        path = run_dir.put("state/a/compression-residual/round-0001.safetensors", data)
        call = lambda: load_residual(cfg, "a", 2, started_from="g2")  # noqa: E731
    with run_dir.unchanged():
        result = outcome(call)
    if isinstance(result, FedFMError):
        assert path in str(result) and "client a" in str(result), result
    else:
        assert all(value.dtype == torch.float32 for value in result.values())


# Schemes that need no network: unknown ones, ones fsspec cannot use without arguments, and local ones.
OFFLINE_SCHEMES = ["", "file://", "memory://", "local://", "zip://", "tar://", "reference://", "dir://", "data:",
                   "nosuch://", "S3://", "file:", "::", "memory::", "zip::memory://", "a+b.c-d://"]


@fuzz(150)
@given(scheme=st.sampled_from(OFFLINE_SCHEMES), rest=st.text(max_size=40)
       | st.sampled_from(["", "/", "//", "\x00", "x" * 5000, "history.json", "inputs", "../run/history.json"]))
def test_storage_uris_read_or_fail_with_a_storage_error(run_dir, scheme, rest):
    uri = scheme + rest if scheme else str(run_dir.root / rest.lstrip("/"))
    with run_dir.unchanged():
        for call in (storage.read_bytes, storage.exists, storage.size):
            result = outcome(lambda: call(uri))
            if isinstance(result, FedFMError):
                assert isinstance(result, StorageError) and uri[:100] in str(result), result


# --------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------


VALID_CONFIG = FederationConfig(execution={"client_state_uri": "/tmp/state"}, data={"labels": ["0", "1"]},
                                clients=["acme", "globex"]).as_dict()
TOP_LEVEL_KEYS = sorted(FederationConfig.model_fields)


def _paths(node: Any, prefix: tuple = ()) -> Iterator[tuple]:
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _paths(value, (*prefix, index))


def _set(root: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    node = root
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return root


def _delete(root: Any, path: tuple) -> None:
    if path:
        node = root
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]


bad_scalars = st.one_of(
    st.none(), st.booleans(), st.text(max_size=12),
    st.integers(-5, 5), st.integers(min_value=2**31) | st.integers(max_value=-2**31) | st.just(10**400),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, -1, -0.5, 0, 0.0, 1e308, 5e-324, "", " ", "NaN", "1e3",
                     "Tenant_A", "UPPER", "-bad-", "a" * 64, "centralized", "x.y", "iid", "dirichlet:-1",
                     "dirichlet:nan", "dirichlet:inf", "column:", "column:site", "kubernetes", "fedavg", "nosuch"]),
)
client_entries = st.one_of(
    st.text(max_size=12), st.sampled_from(["acme", "acme", "Tenant_A", "", "centralized", "a" * 70, "-x"]),
    st.fixed_dictionaries({"name": st.text(max_size=8) | st.just("acme")},
                          optional={"train": st.text(max_size=8) | st.none(), "lora_r": bad_scalars,
                                    "namespace": bad_scalars, "extra": bad_scalars}),
    json_values,
)


def small_client_count(data: Any) -> Any:
    """``data`` with a count of clients above MAX_CLIENTS replaced by MAX_CLIENTS + 1."""
    if isinstance(data, dict):
        count = data.get("clients")
        if isinstance(count, int) and not isinstance(count, bool) and count > MAX_CLIENTS:
            data["clients"] = MAX_CLIENTS + 1
    return data


@st.composite
def config_mutations(draw) -> Any:
    """The valid config with values replaced (wrong types, negative, huge, None/NaN/inf), keys deleted or
    unknown keys added, and bad clients."""
    data = json.loads(json.dumps(VALID_CONFIG))
    for _ in range(draw(st.integers(1, 4))):
        paths = list(_paths(data)) if isinstance(data, (dict, list)) else [()]
        path = draw(st.sampled_from(paths))
        change = draw(st.sampled_from(["replace", "replace", "delete", "unknown", "clients", "section"]))
        if change == "replace":
            data = _set(data, path, draw(bad_scalars | json_values))
        elif change == "delete" and path:
            _delete(data, path)
        elif change == "unknown":
            node = data
            for key in path:
                node = node[key]
            if isinstance(node, dict):
                node[draw(st.text(max_size=10) | st.sampled_from(["rounds", "Rounds", "lr", "client"]))] = \
                    draw(bad_scalars)
        elif change == "clients" and isinstance(data, dict):
            data["clients"] = draw(st.lists(client_entries, max_size=5) | st.integers(-3, MAX_CLIENTS + 1)
                                   | bad_scalars)
        elif change == "section" and isinstance(data, dict):
            data[draw(st.sampled_from(TOP_LEVEL_KEYS))] = draw(json_values | bad_scalars)
    return small_client_count(data)


random_configs = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(TOP_LEVEL_KEYS) | st.text(max_size=10), children, max_size=5),
    max_leaves=20,
).map(lambda value: small_client_count(value))


def check_config(cfg: FederationConfig) -> None:
    """A config that parsed is usable: it is plain JSON (a KFP parameter), parses back equal, draws clients."""
    text = json.dumps(cfg.as_dict(), allow_nan=False)
    assert FederationConfig.parse(json.loads(text)) == cfg
    cfg.sampled_clients(1, sampling_key="00" * 32)
    labels = cfg.data.labels
    if labels is not None:
        assert len(labels) >= 2 and len(set(labels)) == len(labels), labels


@fuzz(300)
@given(data=config_mutations() | random_configs)
def test_configs_parse_or_fail_with_a_config_error(run_dir, data):
    with run_dir.unchanged():
        result = outcome(lambda: FederationConfig.parse(data, source="config under test"))
    if isinstance(result, FedFMError):
        assert isinstance(result, ConfigError), result
        assert "config under test" in str(result)
    else:
        check_config(result)


yaml_snippets = st.sampled_from([
    "rounds: 2001-02-30", "rounds: 2001-02-03", "clients: 2001-02-30 10:00:00", "[" * 700, "{" * 700,
    "a: &a [*a]", "a: &x 1\nb: *y", "!!python/object:os.system {}", "rounds: !!binary AAAA", "? [a]\n: 1",
    "rounds: .inf", "rounds: .nan", "seed: -1", "clients: 0x10", "clients: 0o7", "rounds: 1_0", "%YAML 9.9\n---\na: 1",
    "--- 1\n--- 2", "\t rounds: 2", "rounds: 3\nrounds: 4", "clients: [a, a]", "data: {labels: [x]}", "~",
    "rounds: 1e400", "name: !!str", "compression: {method: topk, topk_fraction: 0}", "a: \"\\ud800\"",
])


@st.composite
def config_files(draw) -> bytes:
    kind = draw(st.sampled_from(["yaml", "json", "text", "snippet", "bytes", "encoding"]))
    if kind == "yaml":
        return yaml.safe_dump(draw(config_mutations() | random_configs), allow_unicode=True).encode()
    if kind == "json":
        return json.dumps(draw(config_mutations())).encode()
    if kind == "text":
        return draw(st.text(max_size=200)).encode("utf-8", "surrogatepass")
    if kind == "snippet":
        return "\n".join(draw(st.lists(yaml_snippets, min_size=1, max_size=3))).encode()
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    text = yaml.safe_dump(VALID_CONFIG, allow_unicode=True) + draw(st.sampled_from(["name: café\n", "# ü\n", ""]))
    return text.encode(draw(st.sampled_from(["utf-16", "utf-32", "latin-1", "cp1252"])), "replace")


@fuzz(200)
@given(content=config_files(), suffix=st.sampled_from([".yaml", ".json", ".yml", ""]))
def test_config_files_load_or_fail_with_a_config_error(run_dir, content, suffix):
    path = run_dir.put(f"federation{suffix}", content)
    with run_dir.unchanged():
        result = outcome(lambda: load_config(path))
    if isinstance(result, FedFMError):
        assert isinstance(result, ConfigError), result
        assert path in str(result), result
    elif result is not None:
        check_config(result)


def test_missing_config_file_and_directory_name_the_path(run_dir):
    with run_dir.unchanged():
        for path in (run_dir.inputs / "missing.yaml", run_dir.inputs):
            with pytest.raises(ConfigError) as info:
                load_config(path)
            assert str(path) in str(info.value)


# --------------------------------------------------------------------------------------------------
# CSV data, read the way a run reads it
# --------------------------------------------------------------------------------------------------


LABELS = ["0", "1", "2", "yes", "no"]
cells = st.one_of(
    st.sampled_from(LABELS), st.sampled_from(["", " ", "NaN", "nan", "NA", "null", "inf", "1.0", "-0", "1e400"]),
    st.text(max_size=12), st.integers(-3, 3).map(str), st.floats().map(repr),
)
column_names = st.sampled_from(["text", "label", "title", "body", "site", "prompt", "response", "", "Label",
                                "text "]) | st.text(max_size=6)


@st.composite
def csv_files(draw) -> bytes:
    """CSV text with random columns and cells in some encoding, or something that is no CSV at all."""
    kind = draw(st.sampled_from(["csv", "csv", "csv", "header-only", "garbage", "empty", "damaged"]))
    if kind == "empty":
        return draw(st.sampled_from([b"", b"\n", b"   \n\n", b"\xef\xbb\xbf"]))
    if kind == "garbage":
        return draw(st.binary(max_size=300))
    columns = draw(st.lists(column_names, min_size=0, max_size=5))
    if draw(st.booleans()):
        columns = ["text", "label"] + columns
    rows = [] if kind == "header-only" else draw(st.lists(
        st.lists(cells, min_size=len(columns), max_size=len(columns)) | st.lists(cells, max_size=7),
        max_size=30))
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(columns)
    writer.writerows(rows)
    encoding = draw(st.sampled_from(["utf-8", "utf-8", "utf-16", "latin-1", "cp1252", "utf-8-sig"]))
    data = buffer.getvalue().encode(encoding, "replace") if encoding != "utf-8" else \
        buffer.getvalue().encode("utf-8", "surrogatepass")
    if kind == "damaged":
        data = draw(corrupted_bytes(data)) if data else data
    return data


@st.composite
def data_configs(draw, path: str) -> FederationConfig | ConfigError:
    clients = draw(st.lists(st.sampled_from(["a", "b", "c", "0", "1", "yes", "east"]), min_size=1, max_size=4,
                            unique=True))
    task = draw(st.sampled_from(["classification", "classification", "causal-lm"]))
    data: dict[str, Any] = {"source": path,
                            "partition": draw(st.sampled_from(["iid", "dirichlet:0.5", "dirichlet:100", "column:site",
                                                               "column:label", "column:text", "column:nope"]))}
    if task == "causal-lm" and data["partition"].startswith("dirichlet"):
        data["partition"] = "iid"
    if draw(st.booleans()):
        data["labels"] = draw(st.lists(st.sampled_from(LABELS), min_size=2, max_size=4, unique=True))
    data["text_column"] = draw(st.sampled_from([["text"], ["title", "body"], ["text", "title"]]))
    if draw(st.booleans()):
        data["max_samples"] = draw(st.integers(1, 20))
    data["eval_fraction"] = draw(st.sampled_from([0.2, 0.5, 0.9]))
    entries: list[Any] = list(clients)
    if draw(st.booleans()):  # one tenant brings its own file (the same one), maybe with a missing eval file
        own = {"name": "own", "train": path}
        if draw(st.booleans()):
            own["eval"] = draw(st.sampled_from([path, path + ".missing.csv"]))
        entries.append(own)
    try:
        return FederationConfig.parse({"task": task, "clients": entries, "data": data, "seed": draw(st.integers(0, 9))})
    except ConfigError as exc:
        return exc


def check_client_data(cfg: FederationConfig, client: str, result: Any) -> None:
    assert list(result.train.columns) == (["text", "label"] if cfg.task == "classification" else
                                          ["prompt", "response"])
    assert len(result.train) > 0, f"client {client} got no training rows without an error"
    if cfg.task == "classification":
        for frame in (result.train, result.eval):
            assert frame["label"].between(0, len(cfg.data.labels) - 1).all()
            assert frame["text"].map(lambda text: isinstance(text, str) and bool(text.strip())).all()


@fuzz(300)
@given(content=csv_files(), draw=st.data())
def test_csv_sources_load_or_fail_with_a_data_error(run_dir, content, draw):
    path = run_dir.put("tickets.csv", content)
    cfg = draw.draw(data_configs(path))
    if isinstance(cfg, ConfigError):
        return
    with run_dir.unchanged():
        resolved = outcome(lambda: resolve_labels(cfg))
        summary = outcome(lambda: describe_clients(cfg))
        per_client = {}
        if isinstance(resolved, FederationConfig):
            for client in [*resolved.client_names, "centralized", "nobody"]:
                per_client[client] = outcome(lambda: load_client_data(resolved, client))
    for result in (resolved, summary, *per_client.values()):
        if isinstance(result, FedFMError):
            assert isinstance(result, (DataError, ConfigError)), result
            message = str(result)
            assert names_any(message, path, "data.", "partition", *[f"client {c!r}" for c in cfg.client_names],
                             "'nobody'"), message
    if isinstance(resolved, FederationConfig):
        for client, result in per_client.items():
            if not isinstance(result, FedFMError):
                assert client != "nobody"
                check_client_data(resolved, client, result)
        if isinstance(summary, dict):
            assert sorted(summary) == sorted(cfg.client_names)
            for client, entry in summary.items():
                if isinstance(per_client.get(client), FedFMError):
                    pytest.fail(f"describe_clients accepted what load_client_data refused: {per_client[client]}")
                assert entry["train"] > 0


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"text,label\n", "found 0 distinct label"),
    ("text,label\nhello,ja\nwelt,nein\n".encode("utf-16"), "is not UTF-8 text"),
    ("text,label\ncafé,ja\nthé,nein\n".encode("latin-1"), "save it as UTF-8"),
    (b"title,label\nx,1\ny,0\n", "has no column 'text'"),
    (b"text,label\nx,1\ny,\nz,0\n", "no value in label column"),
])
def test_csv_errors_name_the_file_and_the_fix(run_dir, content, message):
    path = run_dir.put("tickets.csv", content)
    cfg = FederationConfig(clients=1, data={"source": path, "partition": "iid"})
    with run_dir.unchanged(), pytest.raises(DataError) as info:
        load_client_data(resolve_labels(cfg), "tenant-0")
    assert message in str(info.value) and path in str(info.value)


def test_labels_outside_the_configured_set_are_named(run_dir):
    path = run_dir.put("tickets.csv", "text,label\na,yes\nb,no\nc,maybe\nd,yes\n")
    cfg = FederationConfig(clients=1, data={"source": path, "partition": "iid", "labels": ["no", "yes"]})
    with run_dir.unchanged(), pytest.raises(DataError, match="'maybe'.*data.labels"):
        describe_clients(cfg)


def test_a_client_no_column_value_names_is_named(run_dir):
    path = run_dir.put("tickets.csv", "text,label,site\na,0,east\nb,1,east\nc,0,east\n")
    cfg = FederationConfig(clients=["east", "west"], data={"source": path, "partition": "column:site"})
    with run_dir.unchanged(), pytest.raises(DataError, match="no value of the column names client\\(s\\) 'west'"):
        load_client_data(resolve_labels(cfg), "east")


# --------------------------------------------------------------------------------------------------
# Cases the properties found once, kept as examples
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("numbers", [None, "not json", "[1, 2]", "[" * 3000])
def test_case_server_state_numbers(run_dir, numbers):
    metadata = {"format": SERVER_STATE_FORMAT, "strategy": STRATEGY, "round": "1"}
    if numbers is not None:
        metadata["numbers"] = numbers
    path = run_dir.put("s.safetensors", safetensors_save({}, metadata=metadata))
    with run_dir.unchanged(), pytest.raises(FedFMError, match=path):
        load_server_state(path, STRATEGY)


@pytest.mark.parametrize("content", [b"\xff\xfe rounds: 2", "name: café".encode("utf-16"), b"rounds: 2001-02-30",
                                     b"[" * 700, b'strategy: {params: {"\\ud800\\udc00": 1}}',
                                     b'{"strategy": {"params": {"x": "\\udfff"}}}', b'a: &a [*a, "\\ud800"]'])
def test_case_config_file(run_dir, content):
    """Among them, YAML's surrogate escapes: they decode to no character (a key that came back as another one
    once the config travelled as JSON), so they are refused by their place in the config."""
    path = run_dir.put("federation.yaml", content)
    with run_dir.unchanged(), pytest.raises(ConfigError, match=path) as caught:
        load_config(path)
    if b"\\u" in content:
        assert "holds a lone UTF-16 surrogate" in str(caught.value)


@pytest.mark.parametrize("data", [
    {"training": {"learning_rate": math.inf}}, {"privacy": {"noise_multiplier": math.inf, "clip_norm": 1.0}},
    {"execution": {"poll_seconds": math.inf}},
    {"seed": -1}, {"data": {"labels": ["a", "a"]}}, {"data": {"labels": ["a"]}},
])
def test_case_config_values(data):
    with pytest.raises(ConfigError):
        FederationConfig.parse(data)


def test_case_client_count():
    """A count of clients must be bounded before it is expanded into configs (run in a child process with
    256 MiB of address space, so that an unbounded expansion ends in MemoryError there, not here)."""
    import subprocess
    import sys

    code = (
        "import resource, sys\n"
        "from fedfm.config import FederationConfig\n"
        "from fedfm.errors import ConfigError\n"
        "resource.setrlimit(resource.RLIMIT_AS, (1 << 28, 1 << 28))\n"
        "try:\n"
        "    FederationConfig.parse({'clients': 10**12})\n"
        "except ConfigError:\n"
        "    sys.exit(0)\n"
        "except MemoryError:\n"
        "    sys.exit(3)\n"
        "sys.exit(4)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    assert result.returncode == 0, result.stderr.decode()[-2000:]

