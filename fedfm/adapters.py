"""Adapter files: LoRA state as safetensors, with the metadata a federation needs, and their validation.

A file holds either the *global* adapter of a round or one client's *update* (the difference between
the client's locally trained adapter and the global adapter it started from). Its safetensors header
carries: the format tag, kind, base-model fingerprint, PEFT config, round, sample count, client,
free-form metrics, and a sha256 over the tensor content that :func:`load_adapter` verifies.

Tensors are stored as float32 under PEFT's own state-dict names (``get_peft_model_state_dict``), so a
global adapter converts to a ``PeftModel.from_pretrained`` directory without renaming. An update may
instead be stored compressed (``compression``, see :mod:`fedfm.compression`): its header's
``encoding`` field then describes the stored tensors, the sha256 covers them as stored, and
:func:`load_adapter` hands back float32 tensors under the PEFT names all the same. A file without
``encoding`` is plain float32.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from safetensors.torch import save_file as safetensors_save_file

from fedfm import storage
from fedfm.compression import compress, decode_description, decompress, encode_description
from fedfm.config import CompressionConfig
from fedfm.errors import AdapterError, AdapterValidationError, StorageError

FORMAT = "fedfm-adapter/1"

Kind = Literal["global", "update"]
Tensors = dict[str, torch.Tensor]


# Room for an update's header (its metrics, class counts, encoding table) in update_byte_limit.
UPDATE_HEADER_BYTES = 8 << 20
# More training samples than any client has (a trillion examples): a report above it is a lie or a bug, and
# as a weight it would overflow the float sums of the weighted rules.
MAX_SAMPLES = 10**12


@dataclass
class AdapterMeta:
    kind: Kind
    base_model: str
    peft_config: dict[str, Any]
    round: int
    samples: int = 0
    client: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    sha256: str = ""
    encoding: dict[str, Any] | None = None  # how the stored tensors encode the update (None: plain float32)

    def to_header(self) -> dict[str, str]:
        header = {
            "format": FORMAT,
            "kind": self.kind,
            "base_model": self.base_model,
            "peft_config": json.dumps(self.peft_config, sort_keys=True),
            "round": str(self.round),
            "samples": str(self.samples),
            "metrics": json.dumps(self.metrics, sort_keys=True),
            "sha256": self.sha256,
        }
        if self.client is not None:
            header["client"] = self.client
        if self.encoding is not None:
            header["encoding"] = encode_description(self.encoding)
        return header

    @classmethod
    def from_header(cls, header: dict[str, str] | None, where: str) -> AdapterMeta:
        header = header or {}
        if header.get("format") != FORMAT:
            raise AdapterError(f"{where} is not a FedFM adapter file (format {header.get('format')!r}, "
                               f"expected {FORMAT!r})")
        try:
            kind = header["kind"]
            if kind not in ("global", "update"):
                raise ValueError(f"kind {kind!r} is neither 'global' nor 'update'")
            client = header.get("client")
            if client is not None and not isinstance(client, str):
                raise ValueError(f"client {client!r} is not a string")
            return cls(
                kind=kind,  # type: ignore[arg-type]
                base_model=_string(header, "base_model"),
                peft_config=_json_object(header, "peft_config"),
                round=_count(header, "round"),
                samples=_count(header, "samples"),
                client=client,
                metrics=_json_object(header, "metrics"),
                sha256=_string(header, "sha256"),
                encoding=decode_description(header["encoding"], where) if "encoding" in header else None,
            )
        except KeyError as exc:
            raise AdapterError(f"{where} has a damaged FedFM header (field {exc} is missing); write the file "
                               "again with fedfm") from None
        except (ValueError, TypeError, RecursionError) as exc:
            raise AdapterError(f"{where} has a damaged FedFM header ({exc}); write the file again with "
                               "fedfm") from None


def _string(header: dict[str, str], key: str) -> str:
    value = header[key]
    if not isinstance(value, str):
        raise ValueError(f"field {key!r} is {type(value).__name__}, not a string")
    return value


def _count(header: dict[str, str], key: str) -> int:
    """A header field holding a non-negative integer, as written by ``str(int)``."""
    text = _string(header, key)
    if not text.isascii() or not text.isdigit():
        raise ValueError(f"field {key!r} is {text[:40]!r}, not a non-negative integer")
    return int(text)


def _json_object(header: dict[str, str], key: str) -> dict[str, Any]:
    try:
        value = json.loads(_string(header, key))
    except RecursionError:
        raise ValueError(f"field {key!r} nests too deeply") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"field {key!r} is not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError(f"field {key!r} is a JSON {type(value).__name__}, not an object")
    return value


@dataclass
class Adapter:
    tensors: Mapping[str, torch.Tensor]  # a dict, or a StoredTensors / ScaledTensors read tensor by tensor
    meta: AdapterMeta


# safetensors' dtype names, and the torch dtype each is read as.
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


@dataclass(frozen=True)
class _Stored:
    """Where one tensor lies in a safetensors file: its dtype, shape and byte range in the data section."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def _parse_header(handle: BinaryIO, file_size: int) -> tuple[dict[str, str], dict[str, _Stored], int]:
    """A safetensors file's ``__metadata__``, its tensors' places, and where its data section starts;
    ValueError unless the header is well formed and its tensors tile the data section exactly (as
    safetensors itself requires), so a read at those places never leaves the file."""
    handle.seek(0)
    prefix = handle.read(8)
    if len(prefix) < 8:
        raise ValueError("file shorter than a safetensors header")
    length = int.from_bytes(prefix, "little")
    if length > file_size - 8:
        raise ValueError("header length exceeds file size")
    try:
        header = json.loads(handle.read(length))
    except RecursionError:
        raise ValueError("the header nests too deeply") from None
    if not isinstance(header, dict):
        raise ValueError(f"the header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise ValueError(f"the header's __metadata__ is a JSON {type(metadata).__name__}, not an object")
    places: dict[str, _Stored] = {}
    for name, entry in header.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("dtype"), str) or entry["dtype"] not in _DTYPES:
            raise ValueError(f"tensor {name[:80]!r} has no known dtype")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not isinstance(shape, list) or not all(type(size) is int and size >= 0 for size in shape):
            raise ValueError(f"tensor {name[:80]!r} has no valid shape")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(at) is int for at in offsets)):
            raise ValueError(f"tensor {name[:80]!r} has no valid data_offsets")
        dtype = _DTYPES[entry["dtype"]]
        if offsets[1] - offsets[0] != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"tensor {name[:80]!r}'s data_offsets do not hold its shape")
        places[name] = _Stored(dtype=dtype, shape=tuple(shape), begin=offsets[0], end=offsets[1])
    data_start, covered = 8 + length, 0
    for place in sorted(places.values(), key=lambda place: (place.begin, place.end)):
        if place.begin != covered:
            raise ValueError("the tensors' data_offsets overlap or leave a gap")
        covered = place.end
    if covered != file_size - data_start:
        raise ValueError("the tensors' data does not fill the file")
    return metadata, places, data_start


class StoredTensors(Mapping[str, torch.Tensor]):
    """The tensors of a safetensors file this process owns (:func:`fedfm.storage.private_copy`), read on
    access: names, dtypes and shapes come from the header, and each ``[name]`` reads that tensor's bytes into
    a new tensor the caller owns (no memory map: nothing of the file stays mapped). Code that goes tensor by
    tensor so holds one tensor of the file at a time. Iterates in name order, as :func:`content_sha256` does."""

    def __init__(self, handle: BinaryIO, where: str):
        handle.seek(0, os.SEEK_END)
        self._handle = handle
        self.metadata, self._places, self._data_start = _parse_header(handle, handle.tell())
        self._where = where

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: self._places[name].shape for name in self}

    @property
    def dtypes(self) -> dict[str, torch.dtype]:
        return {name: self._places[name].dtype for name in self}

    def __getitem__(self, name: str) -> torch.Tensor:
        place = self._places[name]
        tensor = torch.empty(place.shape, dtype=place.dtype)
        buffer = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
        done, fd = 0, self._handle.fileno()
        while done < len(buffer):
            got = os.preadv(fd, [buffer[done:]], self._data_start + place.begin + done)
            if got <= 0:  # the copy is this process's: only a damaged disk truncates it
                raise AdapterError(f"{self._where}: tensor {name} ends early (the local copy was truncated)")
            done += got
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._places))

    def __len__(self) -> int:
        return len(self._places)


class ScaledTensors(Mapping[str, torch.Tensor]):
    """``source``'s tensors, each multiplied by ``factor`` as it is read (:func:`scaled`)."""

    def __init__(self, source: Mapping[str, torch.Tensor], factor: float):
        self._source, self._factor = source, factor

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return shapes_of(self._source)

    def __getitem__(self, name: str) -> torch.Tensor:
        value = self._source[name]
        # a tensor read from a file is the caller's own: scaled in place; a held one is left as it is
        return value.mul_(self._factor) if isinstance(self._source, (StoredTensors, ScaledTensors)) \
            else value * self._factor

    def __iter__(self) -> Iterator[str]:
        return iter(self._source)

    def __len__(self) -> int:
        return len(self._source)


def scaled(update: Adapter, factor: float) -> Adapter:
    """``update`` with every tensor multiplied by ``factor`` (as ``value.mul_(factor)`` would), applied as each
    tensor is read: the update is never held whole, nor changed."""
    return Adapter(tensors=ScaledTensors(update.tensors, factor), meta=update.meta)


def mapped(update: Adapter, transform: Callable[[str, torch.Tensor], torch.Tensor]) -> Adapter:
    """``update`` with ``transform(name, tensor)`` applied to each tensor as it is read (shapes unchanged)."""
    return Adapter(tensors=MappedTensors(update.tensors, transform), meta=update.meta)


class MappedTensors(Mapping[str, torch.Tensor]):
    """``source``'s tensors, each passed through ``transform(name, tensor)`` as it is read (:func:`mapped`)."""

    def __init__(self, source: Mapping[str, torch.Tensor], transform: Callable[[str, torch.Tensor], torch.Tensor]):
        self._source, self._transform = source, transform

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return shapes_of(self._source)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._transform(name, self._source[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._source)

    def __len__(self) -> int:
        return len(self._source)


def shapes_of(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape, without reading the tensors of a mapping that reads them on access."""
    shapes = getattr(tensors, "shapes", None)
    return dict(shapes) if shapes is not None else {name: tuple(value.shape) for name, value in tensors.items()}


_CONTENT_NAME = re.compile(r"[0-9a-f]{64}\.safetensors")


def content_named(uri: str | os.PathLike) -> bool:
    """Whether ``uri``'s file is named by its sha256 (:func:`check_content_name`)."""
    return _CONTENT_NAME.fullmatch(os.fspath(uri).rstrip("/").rsplit("/", 1)[-1]) is not None


def check_content_name(uri: str | os.PathLike, file_sha256: str, where: str) -> None:
    """A file named by its sha256 (as the cluster executor publishes global adapters, written once) must hash
    to its name (``file_sha256``: of its bytes): one with other bytes was replaced after it was published, by
    whoever could write there."""
    if content_named(uri) and file_sha256 != os.fspath(uri).rstrip("/").rsplit("/", 1)[-1].split(".")[0]:
        raise AdapterError(f"{where} does not hash to its name: it is not the adapter published under it (replaced "
                           "after it was published); refused")


def content_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """A digest of names, dtypes, shapes and values, independent of file layout; one tensor at a time, each
    hashed where it lies (no copy), so a :class:`StoredTensors` is hashed holding one of its tensors."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
        tensor = None  # noqa: F841 — not held while the next one is read
    return digest.hexdigest()


def save_adapter(uri: str | os.PathLike, tensors: Tensors, meta: AdapterMeta, *, overwrite: bool = False,
                 compression: CompressionConfig | None = None) -> str:
    """Write an adapter file atomically; returns the content sha256 it recorded.

    With ``compression`` (a method other than none) an update is stored encoded, and ``meta.encoding``
    says how; global adapters always go down in float32.
    """
    tensors = {name: value.detach().to("cpu", torch.float32).contiguous() for name, value in tensors.items()}
    meta.encoding = None
    if compression is not None and compression.method != "none":
        if meta.kind != "update":
            raise ValueError(f"only updates are stored compressed, not a {meta.kind!r} adapter")
        tensors, meta.encoding = compress(tensors, compression)
    meta.sha256 = content_sha256(tensors)
    header = meta.to_header()
    # written tensor by tensor from their memory: no second copy of the adapter as bytes
    storage.write_file(uri, lambda path: safetensors_save_file(tensors, path, metadata=header), overwrite=overwrite)
    return meta.sha256


def read_meta(uri: str | os.PathLike) -> AdapterMeta:
    """The header alone (cheap: no tensor data is read for local files)."""
    where = os.fspath(uri)
    if storage.is_remote(where):
        return load_adapter(uri).meta
    try:
        with open(where.removeprefix("file://"), "rb") as handle:
            return AdapterMeta.from_header(StoredTensors(handle, where).metadata, where)
    except FileNotFoundError:
        raise AdapterError(f"adapter file {where} does not exist") from None
    except (OSError, ValueError) as exc:
        raise AdapterError(f"{where} is not a readable safetensors file (truncated or corrupt?): {exc}") from None


def update_byte_limit(shapes: Mapping[str, Sequence[int]]) -> int:
    """The most bytes an update with tensors of ``shapes`` can take: 12 per value (top-k's int64 index beside
    its float32 value; plain float32 takes 4) and UPDATE_HEADER_BYTES for its header."""
    return 12 * sum(math.prod(shape) for shape in shapes.values()) + UPDATE_HEADER_BYTES


def load_adapter(uri: str | os.PathLike, *, who: str | None = None,
                 expected_shapes: Mapping[str, Sequence[int]] | None = None, streamed: bool = False) -> Adapter:
    """Read and integrity-check an adapter file. ``who`` (e.g. ``client tenant-1``) prefixes errors.

    ``expected_shapes`` (an update's tensors, as the receiver computes them) are checked before anything is
    allocated: a file larger than such an update can be (:func:`update_byte_limit`) is not read, and an
    encoding that would decode to other shapes is not decoded. Whatever a sender writes, the receiver's
    memory is bounded by the update it expects.

    The file is streamed into a private copy (:func:`fedfm.storage.private_copy`), whose sha256 is checked
    reading one tensor at a time. The tensors are then a dict, or with ``streamed`` (the aggregation, which
    goes tensor by tensor) a :class:`StoredTensors` over that copy, read one tensor at a time by whoever uses
    it. What is read later is what was checked: no one else can reach the copy, so a file replaced or
    rewritten at ``uri`` after the check changes nothing. An encoded update is decoded whole (its decoders
    work on the update's encoded tensors together)."""
    where = f"{who}'s adapter {os.fspath(uri)}" if who else f"adapter {os.fspath(uri)}"
    limit = None
    try:
        if expected_shapes is not None:
            size, limit = storage.size(uri), update_byte_limit(expected_shapes)
            if size > limit:
                raise AdapterValidationError(f"{where} is {size} bytes; an update of this adapter's shapes takes at "
                                             f"most {limit}: not read", client=_client_of(who))
        copy, file_sha256 = storage.private_copy(uri, limit, file_sha256=content_named(uri))
    except StorageError as exc:
        raise AdapterError(f"cannot read {where}: {exc}") from None
    if file_sha256 is not None:
        check_content_name(uri, file_sha256, where)
    try:
        stored = StoredTensors(copy, where)
    except ValueError as exc:
        copy.close()
        raise AdapterError(f"{where} is not a valid safetensors file (truncated or corrupt?): {exc}") from None
    meta = AdapterMeta.from_header(stored.metadata, where)
    # read once: a dict (as PEFT, safetensors, the decoders and the strategies' callers take it) is hashed as read
    tensors: Mapping[str, torch.Tensor] = stored if streamed and meta.encoding is None else dict(stored)
    if tensors is not stored:
        copy.close()
    if content_sha256(tensors) != meta.sha256:
        raise AdapterError(f"{where} fails its sha256 check: the tensor data was altered or damaged")
    if meta.encoding is not None:
        return Adapter(tensors=decompress(tensors, meta.encoding, where=where, expected_shapes=expected_shapes),
                       meta=meta)
    for name, dtype in stored.dtypes.items():
        if dtype != torch.float32:
            raise AdapterError(f"{where}: tensor {name} is {str(dtype).removeprefix('torch.')}, but a file without "
                               "an encoding holds float32 tensors; write it with fedfm.adapters.save_adapter")
    return Adapter(tensors=tensors, meta=meta)


# What of a global adapter's record its receivers (every tenant) may read: figures of the round as a whole.
# Per-client figures (samples, losses, norms, timings, who was counted, missing, clipped or quarantined) stay
# with the federation's record.
PUBLIC_METRICS = ("strategy", "train_loss", "round_seconds", "aggregate_seconds", "privacy", "created_at")


def public_copy(data: bytes, *, where: str = "global adapter") -> bytes:
    """A global adapter's file as it goes to the tenants: the same tensors (and sha256), with only the round's
    aggregate figures in its header (PUBLIC_METRICS, and how many clients counted)."""
    try:
        tensors = safetensors_load(data)
        meta = AdapterMeta.from_header(header_of(data), where)
    except (SafetensorError, ValueError) as exc:
        raise AdapterError(f"{where} is not a valid safetensors file (truncated or corrupt?): {exc}") from None
    if meta.kind != "global":
        raise AdapterError(f"{where} is a client update; only global adapters are published")
    public = {key: meta.metrics[key] for key in PUBLIC_METRICS if key in meta.metrics}
    if "counted" in meta.metrics:
        public["clients_counted"] = len(meta.metrics["counted"])
    meta.metrics = public
    return safetensors_save(tensors, metadata=meta.to_header())


def _client_of(who: str | None) -> str | None:
    return who.removeprefix("client ") if who and who.startswith("client ") else None


def header_of(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's bytes (its 8-byte length, then the JSON header);
    ValueError if they hold none."""
    return _parse_header(io.BytesIO(data), len(data))[0]


def validate_update(update: Adapter, reference: Adapter, *, client: str, round_index: int,
                    expected_shapes: dict[str, tuple[int, ...]] | None = None) -> None:
    """Check one client's update against the round's global adapter; raise naming the client and tensor.

    Checks, in order: it is an update for this round, trained on the same base model, with exactly the
    tensors and shapes expected of this client (``expected_shapes``; default: the global adapter's),
    and every value finite.
    """
    meta = update.meta
    if meta.kind != "update":
        raise AdapterValidationError(f"client {client} sent a {meta.kind!r} adapter, not an update", client=client)
    if meta.round != round_index:
        raise AdapterValidationError(
            f"client {client} sent an update for round {meta.round}, but this is round {round_index}", client=client
        )
    if meta.base_model != reference.meta.base_model:
        raise AdapterValidationError(
            f"client {client} trained on another base model: fingerprint {meta.base_model[:16]}… differs from the "
            f"federation's {reference.meta.base_model[:16]}…",
            client=client,
        )
    if not 0 < meta.samples <= MAX_SAMPLES:
        digits = str(meta.samples)
        shown = digits if len(digits) <= 13 else f"{digits[:12]}… ({len(digits)} digits)"
        raise AdapterValidationError(f"client {client} reports {shown} training samples (a count from 1 to "
                                     f"{MAX_SAMPLES:.0e})", client=client)
    got, reference_shapes = shapes_of(update.tensors), shapes_of(reference.tensors)
    expected = expected_shapes or reference_shapes
    for name in sorted(expected):
        if name not in got:
            raise AdapterValidationError(f"client {client}'s update lacks tensor {name}", client=client, tensor=name)
    for name in sorted(got):
        if name not in expected:
            why = "this client trains it frozen" if name in reference_shapes else "the global adapter does not have it"
            raise AdapterValidationError(f"client {client}'s update has tensor {name}, which it should not send "
                                         f"({why})", client=client, tensor=name)
    for name in sorted(expected):
        if tuple(got[name]) != tuple(expected[name]):
            whose = "the global adapter's is" if expected_shapes is None else "this client's should be"
            raise AdapterValidationError(
                f"client {client}'s tensor {name} has shape {tuple(got[name])}; {whose} "
                f"{tuple(expected[name])}",
                client=client,
                tensor=name,
            )
    for name in sorted(got):  # one tensor read at a time, checked in slices (isfinite's temporaries are a slice's)
        bad = sum(int((~torch.isfinite(part)).sum()) for part in update.tensors[name].reshape(-1).split(1 << 20))
        if bad:
            raise AdapterValidationError(
                f"client {client}'s tensor {name} has {bad} non-finite value{'s' if bad > 1 else ''} (NaN/inf)",
                client=client,
                tensor=name,
            )


def l2_norm(tensors: Mapping[str, torch.Tensor]) -> float:
    """Over all the tensors together, one at a time, in name order (the sum's order fixes its last bit)."""
    return math.sqrt(sum(float(tensors[name].double().pow(2).sum()) for name in sorted(tensors)))
