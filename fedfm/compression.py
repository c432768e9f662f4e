"""Compression of what clients send: an update's tensors as fp16, bf16, blockwise int8 or top-k.

Pure functions, tensors in and tensors out. :func:`compress` turns an update's tensors into a few flat
*stored* tensors and a small JSON-able *description*; :func:`decompress` gives float32 tensors of the
original names and shapes back. :mod:`fedfm.adapters` writes the stored tensors into the update file
and the description into its header (:func:`encode_description`), so the server reads float32 as before.

What each method stores (flat tensors, one part per update tensor, in the description's order):

- ``fp16``: ``values`` float16. Each tensor is first scaled by a power of two (its ``exponent``) that
  puts its largest magnitude in [2^14, 2^15): exact, and LoRA deltas of 1e-6 neither underflow into
  fp16's subnormals nor large ones overflow.
- ``bf16``: ``values`` bfloat16 (float32's range, 8 significant bits).
- ``int8``: ``values`` int8 and ``scales`` float16. Each flattened tensor is cut into blocks of
  ``block_size`` values (the last may be shorter); a block's scale is its absmax/127, rounded *down*
  to fp16 after the tensor's power-of-two ``exponent`` shift, and its values are rounded to
  ``round(x / scale)`` clamped to ±127. Rounding the scale down keeps every error within absmax/254
  (a value the clamp cuts loses at most absmax·2^-10). fp16 scales rather than float32 because at the
  default 64 values per block float32 scales alone add 1/64 to the file, 6 % of an int8 update.
- ``topk``: ``indices`` int32 (int64 only for a tensor beyond 2^31 values) and ``values`` float32: per
  tensor the ⌈fraction·numel⌉ values of largest magnitude, exact; every other value is sent as 0.

The tensors are packed into those two or three stored tensors, not one per name, and the description
keeps names and shapes zlib-compressed: for a MiniLM LoRA (50 tensors named like
``base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight``) the names alone take 4 KB,
3 % of an int8 update, when written out once per stored tensor.

Error feedback (EF-SGD, Karimireddy et al. 2019, https://arxiv.org/abs/1901.09847): a client adds to
its update what compression left out of its earlier ones (:func:`with_error_feedback`) and keeps what
this round's leaves out (:func:`unsent`), so nothing is lost, only delayed: the sum of what it sent
stays within one residual of the sum of its true updates.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import psutil
import torch

from fedfm.config import CompressionConfig
from fedfm.errors import AdapterError

Tensors = dict[str, torch.Tensor]
Description = dict[str, Any]
_Encoded = tuple[Tensors, dict[str, Any], list[dict[str, Any]]]  # stored tensors, parameters, tensor table

_INT8_MAX = 127
_FP16_TOP_EXPONENT = 15  # a tensor's largest fp16 magnitude (or int8 scale) lands in [2^14, 2^15)
_MAX_EXPONENT = 300  # float32 magnitudes need shifts within ±200; 2.0**1024 would overflow
_INT32_LIMIT = 2**31 - 1
_MAX_TABLE_BYTES = 64 << 20  # a header's tensor table inflates to at most this (no zlib bombs)
_MAX_VALUES = 1 << 40  # values one encoded tensor may claim: far beyond any adapter, and a damaged shape's
# product (up to 10^400 from a few big sizes) is refused before anything is computed or allocated


# --- compress ------------------------------------------------------------------------------------


def compress(tensors: Tensors, config: CompressionConfig) -> tuple[Tensors, Description]:
    """The stored tensors and the description of ``tensors`` encoded by ``config.method``."""
    encode = _ENCODERS.get(config.method)
    if encode is None:
        raise ValueError(f"compression method {config.method!r} has no encoding (known: {', '.join(_ENCODERS)})")
    flat = {name: _finite_float32(name, value) for name, value in sorted(tensors.items())}
    stored, parameters, rows = encode(flat, config)
    return stored, {"method": config.method, **parameters, "tensors": rows}


def _finite_float32(name: str, value: torch.Tensor) -> torch.Tensor:
    value = value.detach().to("cpu", torch.float32).contiguous()
    bad = int((~torch.isfinite(value)).sum())
    if bad:
        raise AdapterError(f"cannot compress tensor {name}: it has {bad} non-finite value{'s' if bad > 1 else ''}")
    return value


def _row(name: str, value: torch.Tensor, **extra: int) -> dict[str, Any]:
    return {"name": name, "shape": list(value.shape), **extra}


def _shift(magnitude: float) -> int:
    """The power of two that divides ``magnitude`` into [2^14, 2^15), fp16's top octave but one."""
    if magnitude == 0:
        return 0
    _, exponent = math.frexp(magnitude)  # magnitude = m·2^exponent, 0.5 <= m < 1
    return exponent - _FP16_TOP_EXPONENT


def _encode_fp16(tensors: Tensors, config: CompressionConfig) -> _Encoded:
    rows, values = [], []
    for name, value in tensors.items():
        exponent = _shift(float(value.abs().max())) if value.numel() else 0
        rows.append(_row(name, value, exponent=exponent))
        values.append((value.reshape(-1).double() * 2.0**-exponent).to(torch.float16))
    return {"values": _concatenated(values, torch.float16)}, {}, rows


def _encode_bf16(tensors: Tensors, config: CompressionConfig) -> _Encoded:
    rows = [_row(name, value) for name, value in tensors.items()]
    values = [value.reshape(-1).to(torch.bfloat16) for value in tensors.values()]
    return {"values": _concatenated(values, torch.bfloat16)}, {}, rows


def _encode_int8(tensors: Tensors, config: CompressionConfig) -> _Encoded:
    rows, values, scales = [], [], []
    for name, value in tensors.items():
        quantized, block_scales, exponent = _quantize_int8(value.reshape(-1), config.block_size)
        rows.append(_row(name, value, exponent=exponent))
        values.append(quantized)
        scales.append(block_scales)
    return ({"values": _concatenated(values, torch.int8), "scales": _concatenated(scales, torch.float16)},
            {"block_size": config.block_size}, rows)


def _quantize_int8(flat: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One flat tensor's int8 values, its blocks' fp16 scales, and the power of two those scales are
    shifted by (the scale of a block is ``scales[i] · 2^exponent``)."""
    blocks = _blocks(flat.double(), block)
    absmax = blocks.abs().amax(dim=1)
    exponent = _shift(float(absmax.max()) / _INT8_MAX) if len(absmax) else 0
    scales = _fp16_at_most(absmax / _INT8_MAX * 2.0**-exponent)
    scale = (scales.double() * 2.0**exponent)[:, None]
    # a block whose scale is 0 (all zeros, or far below the tensor's largest block) is sent as zeros
    ratio = torch.where(scale > 0, blocks / torch.where(scale > 0, scale, 1.0), 0.0)
    quantized = ratio.round().clamp(-_INT8_MAX, _INT8_MAX).to(torch.int8).reshape(-1)[: flat.numel()]
    return quantized, scales, exponent


def _blocks(flat: torch.Tensor, block: int) -> torch.Tensor:
    """``flat`` as rows of ``block`` values, the last one padded with zeros (which change no absmax)."""
    count = math.ceil(flat.numel() / block)
    return torch.nn.functional.pad(flat, (0, count * block - flat.numel())).reshape(count, block)


def _fp16_at_most(values: torch.Tensor) -> torch.Tensor:
    """``values`` (non-negative, below 65504) as the nearest fp16 numbers not above them."""
    rounded = values.to(torch.float16)
    above = rounded.double() > values
    bits = rounded.view(torch.int16)  # positive fp16 numbers order like their bit patterns
    bits -= above.to(torch.int16)
    return rounded


def _encode_topk(tensors: Tensors, config: CompressionConfig) -> _Encoded:
    rows, indices, values = [], [], []
    for name, value in tensors.items():
        flat = value.reshape(-1)
        kept = kept_count(flat.numel(), config.topk_fraction)
        chosen = flat.abs().topk(kept, sorted=False).indices.sort().values
        rows.append(_row(name, value, kept=kept))
        indices.append(chosen)
        values.append(flat[chosen])
    wide = any(value.numel() > _INT32_LIMIT for value in tensors.values())
    index_dtype = torch.int64 if wide else torch.int32
    return ({"indices": _concatenated(indices, torch.int64).to(index_dtype),
             "values": _concatenated(values, torch.float32)}, {"fraction": config.topk_fraction}, rows)


def kept_count(numel: int, fraction: float) -> int:
    """⌈fraction·numel⌉, with ``fraction`` read as written (0.1 of 30 is 3, not 4 by binary rounding)."""
    return min(numel, math.ceil(Fraction(repr(fraction)) * numel))


def _concatenated(parts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    return torch.cat(parts).contiguous() if parts else torch.zeros(0, dtype=dtype)


# --- decompress ----------------------------------------------------------------------------------


@dataclass
class _Entry:
    """One update tensor as the description lists it."""

    name: str
    shape: tuple[int, ...]
    row: dict[str, Any]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def decompress(stored: Tensors, description: Description, *, where: str = "compressed update",
               expected_shapes: Mapping[str, Sequence[int]] | None = None) -> Tensors:
    """The float32 tensors that ``stored`` encodes as ``description`` says; AdapterError (prefixed by
    ``where``, naming the tensor) for a description or stored data that do not fit together, or that would
    decode to a tensor not of ``expected_shapes`` (checked before anything is decoded: a few bytes cannot
    claim gigabytes)."""
    if not isinstance(description, dict):
        raise AdapterError(f"{where}: its encoding is {type(description).__name__}, not a JSON object")
    method = description.get("method")
    if not isinstance(method, str) or method not in _DECODERS:
        raise AdapterError(f"{where}: unknown encoding method {_shown(method)} (known: {', '.join(_DECODERS)})")
    dtypes, decode = _DECODERS[method]
    _check_stored(stored, dtypes, method, where)
    entries = _entries(description, where)
    if expected_shapes is not None:
        for entry in entries:
            if entry.name not in expected_shapes:
                raise AdapterError(f"{where}: its encoding holds tensor {entry.name}, which the update does not have")
            if entry.shape != tuple(expected_shapes[entry.name]):
                raise AdapterError(f"{where}: tensor {entry.name} has shape {_shown(list(entry.shape))} in its "
                                   f"encoding; the update's is {list(expected_shapes[entry.name])}")
    return decode(stored, description, entries, where)


def _entries(description: Description, where: str) -> list[_Entry]:
    rows = description.get("tensors")
    if not isinstance(rows, list):
        raise AdapterError(f"{where}: its encoding lists no tensors")
    entries: list[_Entry] = []
    seen: set[str] = set()
    for position, row in enumerate(rows):
        name = row.get("name") if isinstance(row, dict) else None
        if not isinstance(name, str) or not name:
            raise AdapterError(f"{where}: entry {position} of its encoding names no tensor")
        shape = row.get("shape")
        if not isinstance(shape, list) or not all(_is_int(size) and size >= 0 for size in shape):
            raise AdapterError(f"{where}: tensor {name} has shape {_shown(shape)} in its encoding, not a list of "
                               "sizes")
        if math.prod(shape) > _MAX_VALUES:
            raise AdapterError(f"{where}: tensor {name} has shape {_shown(shape)} in its encoding, more than "
                               f"{_MAX_VALUES} values (a damaged encoding)")
        if name in seen:
            raise AdapterError(f"{where}: tensor {name} appears twice in its encoding")
        seen.add(name)
        entries.append(_Entry(name, tuple(shape), row))
    return entries


def _shown(value: Any, limit: int = 80) -> str:
    """``repr(value)``, shortened: a damaged header may hold anything."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _integer(entry: _Entry, key: str, low: int, high: int, where: str) -> int:
    value = entry.row.get(key)
    if not _is_int(value) or not low <= value <= high:
        raise AdapterError(f"{where}: tensor {entry.name} has {key} {_shown(value)} in its encoding; expected an "
                           f"integer from {low} to {high}")
    return value


def _check_stored(stored: Tensors, dtypes: dict[str, tuple[torch.dtype, ...]], method: str, where: str) -> None:
    unexpected = sorted(set(stored) - set(dtypes))
    if unexpected:
        raise AdapterError(f"{where}: stored tensor {unexpected[0]} is not part of the {method} encoding "
                           f"(which stores {', '.join(dtypes)})")
    for name, allowed in dtypes.items():
        if name not in stored:
            raise AdapterError(f"{where}: stored tensor {name} of its {method} encoding is missing")
        value = stored[name]
        if value.dtype not in allowed or value.dim() != 1:
            expected = " or ".join(str(dtype).removeprefix("torch.") for dtype in allowed)
            raise AdapterError(f"{where}: stored tensor {name} is {str(value.dtype).removeprefix('torch.')} of shape "
                               f"{tuple(value.shape)}; the {method} encoding stores it flat as {expected}")


class _Reader:
    """Hands out consecutive parts of one flat stored tensor, naming the tensor that overruns it."""

    def __init__(self, stored: torch.Tensor, label: str, where: str):
        self.stored, self.label, self.where, self.offset = stored, label, where, 0

    def take(self, count: int, entry: _Entry) -> torch.Tensor:
        end = self.offset + count
        if end > self.stored.numel():
            raise AdapterError(f"{self.where}: tensor {entry.name} needs {self.label}[{self.offset}:{end}], but only "
                               f"{self.stored.numel()} {self.label} are stored (its encoding does not fit its data)")
        part = self.stored[self.offset : end]
        self.offset = end
        return part

    def finish(self) -> None:
        left = self.stored.numel() - self.offset
        if left:
            raise AdapterError(f"{self.where}: {left} stored {self.label} belong to no tensor of its encoding "
                               "(its encoding does not fit its data)")


def _decode_fp16(stored: Tensors, description: Description, entries: list[_Entry], where: str) -> Tensors:
    values, out = _Reader(stored["values"], "values", where), {}
    for entry in entries:
        exponent = _integer(entry, "exponent", -_MAX_EXPONENT, _MAX_EXPONENT, where)
        out[entry.name] = (values.take(entry.numel, entry).double() * 2.0**exponent).float().reshape(entry.shape)
    values.finish()
    return out


def _decode_bf16(stored: Tensors, description: Description, entries: list[_Entry], where: str) -> Tensors:
    values, out = _Reader(stored["values"], "values", where), {}
    for entry in entries:
        out[entry.name] = values.take(entry.numel, entry).float().reshape(entry.shape)
    values.finish()
    return out


def _decode_int8(stored: Tensors, description: Description, entries: list[_Entry], where: str) -> Tensors:
    block = description.get("block_size")
    if not _is_int(block) or block < 1:
        raise AdapterError(f"{where}: its int8 encoding has block_size {_shown(block)}, not a positive integer")
    values, scales, out = _Reader(stored["values"], "values", where), _Reader(stored["scales"], "scales", where), {}
    for entry in entries:
        exponent = _integer(entry, "exponent", -_MAX_EXPONENT, _MAX_EXPONENT, where)
        quantized = values.take(entry.numel, entry).double()
        scale = scales.take(-(-entry.numel // block), entry).double() * 2.0**exponent
        # a block never spans more than the tensor: repeating a scale block_size times could allocate
        # far more than the tensor when a damaged header claims a huge block_size
        per_block = min(block, entry.numel)
        out[entry.name] = (quantized * scale.repeat_interleave(per_block)[: entry.numel]).float().reshape(entry.shape)
    values.finish()
    scales.finish()
    return out


def _decode_topk(stored: Tensors, description: Description, entries: list[_Entry], where: str) -> Tensors:
    fraction = description.get("fraction")
    if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0 < fraction <= 1:
        raise AdapterError(f"{where}: its topk encoding has fraction {_shown(fraction)}, not a number in (0, 1]")
    indices, values = _Reader(stored["indices"], "indices", where), _Reader(stored["values"], "values", where)
    out = {}
    for entry in entries:
        kept = _integer(entry, "kept", 0, entry.numel, where)
        if kept != kept_count(entry.numel, fraction):
            # what the encoder keeps; it also bounds the tensor a few stored values decode into
            raise AdapterError(f"{where}: tensor {entry.name} has kept {kept} in its encoding, but a fraction of "
                               f"{fraction} of its {entry.numel} values is {kept_count(entry.numel, fraction)}")
        chosen, chosen_values = indices.take(kept, entry).long(), values.take(kept, entry)
        if kept and (int(chosen.min()) < 0 or int(chosen.max()) >= entry.numel):
            raise AdapterError(f"{where}: tensor {entry.name} has stored indices outside 0..{entry.numel - 1}")
        if torch.unique(chosen).numel() != kept:
            raise AdapterError(f"{where}: tensor {entry.name} has a stored index twice")
        flat = _zeros(entry, where)
        flat[chosen] = chosen_values
        out[entry.name] = flat.reshape(entry.shape)
    indices.finish()
    values.finish()
    return out


def _zeros(entry: _Entry, where: str) -> torch.Tensor:
    # Checked before allocating: where the kernel overcommits memory (vm.overcommit_memory=1, which every
    # kubelet sets on its node), a header claiming a huge tensor gets its allocation and the zero-filling
    # then takes the machine's memory until the OOM killer ends the process; the aggregator, for one
    # tenant's few bytes.
    needed, available = entry.numel * 4, psutil.virtual_memory().available
    if needed > available:
        raise AdapterError(f"{where}: tensor {entry.name} of shape {entry.shape} does not fit in memory "
                           f"({entry.numel} values, {needed / 2**30:.1f} GiB; "
                           f"{available / 2**30:.1f} GiB available); its encoding is "
                           "damaged, or the update far larger than this federation's adapter")
    try:
        return torch.zeros(entry.numel, dtype=torch.float32)
    except (RuntimeError, MemoryError):  # torch reports a failed allocation as RuntimeError
        raise AdapterError(f"{where}: tensor {entry.name} of shape {entry.shape} does not fit in memory "
                           f"({entry.numel} values); its encoding is damaged, or the update far larger than "
                           "this federation's adapter") from None


_Encoder = Callable[[Tensors, CompressionConfig], _Encoded]
_Decoder = Callable[[Tensors, Description, list[_Entry], str], Tensors]

_ENCODERS: dict[str, _Encoder] = {"fp16": _encode_fp16, "bf16": _encode_bf16, "int8": _encode_int8,
                                  "topk": _encode_topk}
_DECODERS: dict[str, tuple[dict[str, tuple[torch.dtype, ...]], _Decoder]] = {
    "fp16": ({"values": (torch.float16,)}, _decode_fp16),
    "bf16": ({"values": (torch.bfloat16,)}, _decode_bf16),
    "int8": ({"values": (torch.int8,), "scales": (torch.float16,)}, _decode_int8),
    "topk": ({"indices": (torch.int32, torch.int64), "values": (torch.float32,)}, _decode_topk),
}


# --- the description in a header -----------------------------------------------------------------


def encode_description(description: Description) -> str:
    """``description`` as one header string: JSON, its tensor table zlib-compressed and base64-encoded
    (the table repeats every tensor's long PEFT name, which compresses about tenfold)."""
    table = json.dumps(description["tensors"], separators=(",", ":")).encode()
    packed = base64.b64encode(zlib.compress(table, 9)).decode("ascii")
    return json.dumps({**description, "tensors": packed}, separators=(",", ":"), sort_keys=True)


def decode_description(text: str, where: str) -> Description:
    """The description :func:`encode_description` wrote; AdapterError naming ``where`` if damaged."""
    try:
        description = json.loads(text)
        inflater = zlib.decompressobj()
        table = inflater.decompress(base64.b64decode(description["tensors"], validate=True), _MAX_TABLE_BYTES)
        if inflater.unconsumed_tail or not inflater.eof:
            raise ValueError("its tensor table is truncated or larger than any adapter's")
        description["tensors"] = json.loads(table)
    except (ValueError, KeyError, TypeError, zlib.error, binascii.Error) as exc:
        raise AdapterError(f"{where} has a damaged encoding header ({_shown(str(exc), 300)})") from None
    except RecursionError:
        raise AdapterError(f"{where} has a damaged encoding header (it nests too deeply)") from None
    return description


# --- error feedback ------------------------------------------------------------------------------


def uses_error_feedback(config: CompressionConfig) -> bool:
    """Whether a client carries what compression leaves out into its next update (fp16/bf16 lose too
    little to be worth a state file)."""
    return config.error_feedback and config.method in ("int8", "topk")


def with_error_feedback(tensors: Tensors, residual: Tensors, *,
                        where: str = "the error-feedback residual") -> Tensors:
    """``tensors`` plus what earlier rounds left unsent (``residual``; a tensor it lacks counts as 0)."""
    for name in sorted(residual):
        if name not in tensors:
            raise AdapterError(f"{where} has tensor {name}, which the update does not")
        if tuple(residual[name].shape) != tuple(tensors[name].shape):
            raise AdapterError(f"{where} has tensor {name} of shape {tuple(residual[name].shape)}; the update's is "
                               f"{tuple(tensors[name].shape)}")
    return {name: value.float() + residual[name].float() if name in residual else value.float()
            for name, value in tensors.items()}


def unsent(wanted: Tensors, sent: Tensors) -> Tensors:
    """What compression left out of ``wanted`` (``sent`` is what :func:`decompress` gives): the next residual."""
    return {name: (value.float() - sent[name]).contiguous() for name, value in wanted.items()}


def tensor_bytes(tensors: Tensors) -> int:
    """Bytes the tensors' values take (what a file holds besides its header)."""
    return sum(value.numel() * value.element_size() for value in tensors.values())
