"""What a client keeps and never sends: its personal part of the adapter (FedSA-LoRA's lora_B), and
the residual that compression with error feedback left out of its updates (``compression-residual/``).

One safetensors file per round under the client's state location
(:meth:`~fedfm.config.FederationConfig.client_state_location`), so a round never overwrites an earlier
one and the state for any round is the newest file at or before it.
"""

from __future__ import annotations

import json
import time

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from fedfm import storage
from fedfm.adapters import Tensors
from fedfm.config import FederationConfig
from fedfm.errors import AdapterError, ConfigError, StorageError

RESIDUAL_DIRECTORY = "compression-residual"


def _location(cfg: FederationConfig, client: str, what: str = "a personal adapter part", remedy: str = "") -> str:
    location = cfg.client_state_location(client)
    if location is None:
        raise ConfigError(f"client {client} keeps {what} but has nowhere to keep it: set its state_uri or "
                          f"execution.client_state_uri{remedy}")
    return location


def _round_file(directory: str, round_index: int) -> str:
    return f"{directory}/round-{round_index:04d}.safetensors"


def _newest(directory: str, before: int, client: str, what: str) -> Tensors:
    """The tensors of the newest round file in ``directory`` from round ``before`` back ({} if none)."""
    for earlier in range(before, 0, -1):
        uri = _round_file(directory, earlier)
        if storage.exists(uri):
            data = storage.read_bytes(uri)
            try:
                tensors = safetensors_load(data)
            except Exception as exc:  # safetensors raises several types for damaged bytes
                raise AdapterError(f"client {client}'s {what} {uri} is damaged ({exc}); delete it to start that "
                                   "state afresh, or restore it") from None
            for name, value in sorted(tensors.items()):
                if value.dtype != torch.float32:
                    raise AdapterError(f"client {client}'s {what} {uri} is damaged: tensor {name} is "
                                       f"{str(value.dtype).removeprefix('torch.')}, not float32")
            return tensors
    return {}


def _encoded(tensors: Tensors, client: str, round_index: int, **metadata: str) -> bytes:
    """A state file's bytes: the tensors as float32 (what :func:`_newest` accepts back)."""
    values = {name: value.detach().to("cpu", torch.float32).contiguous() for name, value in tensors.items()}
    return safetensors_save(values, metadata={"client": client, "round": str(round_index), **metadata})


def save_personal(cfg: FederationConfig, client: str, round_index: int, tensors: Tensors) -> str:
    """Write ``client``'s personal tensors after ``round_index``; returns the URI."""
    uri = _round_file(_location(cfg, client), round_index)
    # a retried round (a Job's second attempt) replaces its own unused first attempt; earlier rounds'
    # files are never touched
    storage.write_bytes(uri, _encoded(tensors, client, round_index), overwrite=True)
    return uri


def load_personal(cfg: FederationConfig, client: str, round_index: int) -> Tensors:
    """``client``'s personal tensors as of ``round_index`` (its newest file at or before it; none before
    it first trained)."""
    return _newest(_location(cfg, client), round_index, client, "personal state")


def _residual_directory(cfg: FederationConfig, client: str) -> str:
    location = _location(cfg, client, "its compression error-feedback residual",
                         " (or set compression.error_feedback to false)")
    return f"{location}/{RESIDUAL_DIRECTORY}"


def residual_uri(cfg: FederationConfig, client: str, round_index: int) -> str:
    """Where ``client`` keeps what its update for ``round_index`` left unsent."""
    return _round_file(_residual_directory(cfg, client), round_index)


def load_residual(cfg: FederationConfig, client: str, round_index: int, started_from: str) -> Tensors:
    """What ``client``'s earlier updates left unsent, to add to its update for ``round_index`` (its
    newest residual file before it: a client not drawn in a round keeps what it had; none: nothing).
    ``started_from``: the sha256 of the global adapter this attempt trains from.

    Called before the client trains, so that it also fails fast where ``round_index``'s own residual
    already exists from another start: a state location serves one run. One from the same global
    adapter is an earlier attempt at this very round (a Job's retry, or a run resumed at this round
    after it was cut off): :func:`save_residual` keeps it beside the new one.
    """
    own = residual_uri(cfg, client, round_index)
    if storage.exists(own) and _started_from(storage.read_bytes(own)) != started_from:
        raise StorageError(f"client {client}'s error-feedback residual for round {round_index} already exists at "
                           f"{own}, from another start of the round: this round already ran with this state "
                           "location; give a new run its own state_uri or execution.client_state_uri")
    return _newest(_residual_directory(cfg, client), round_index - 1, client, "error-feedback residual")


def save_residual(cfg: FederationConfig, client: str, round_index: int, tensors: Tensors, started_from: str) -> str:
    """Write what ``client``'s update for ``round_index`` left unsent, recording ``started_from`` (the
    global adapter's sha256). Never over an existing file: an earlier attempt at this round from the
    same global adapter is first kept beside, as ``round-NNNN.safetensors.interrupted-TIME`` (no round
    reads it again); one from another start is refused."""
    uri = residual_uri(cfg, client, round_index)
    again = False
    if storage.exists(uri):
        data = storage.read_bytes(uri)
        again = _started_from(data) == started_from
        if again:
            _keep_beside(uri, data)
    storage.write_bytes(uri, _encoded(tensors, client, round_index, started_from=started_from), overwrite=again)
    return uri


def _started_from(data: bytes) -> str | None:
    """The global adapter's sha256 a residual file records (None: unreadable, or not recorded)."""
    try:
        length = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8:8 + length]).get("__metadata__") or {}
    except (ValueError, AttributeError):
        return None
    return metadata.get("started_from") if isinstance(metadata, dict) else None


def _keep_beside(uri: str, data: bytes) -> str:
    """A copy of ``uri``'s ``data`` under ``URI.interrupted-TIME`` (never over another one)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for attempt in range(1000):
        beside = f"{uri}.interrupted-{stamp}" + (f"-{attempt}" if attempt else "")
        if not storage.exists(beside):
            storage.write_bytes(beside, data)
            return beside
    raise StorageError(f"{uri}: too many earlier attempts kept beside it")
