"""The server state one round hands the next: one safetensors file holding three owners' parts.

- the aggregation rule's own (FedAdam's moments, FedAvgM's momentum, a step count),
- the privacy mechanism's (``privacy.``-prefixed: the rounds spent, adaptive clipping's norm, the secret
  key that draws each round's clients; :class:`fedfm.trust.privacy.PrivacyState`),
- the quarantine's (``checks.``-prefixed: who is out and since when; :class:`fedfm.trust.update_checks.Quarantine`),
- under secure aggregation, the last round's record for its evaluation (``secagg.``-prefixed: its survivors,
  their public keys and confirmations; :data:`fedfm.trust.secure_round.EVALUATION_STATE`).

Tensors go in as float32 tensors, everything else as JSON in the header. Round 1 reads an empty file (or
none): no state yet.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from fedfm import storage
from fedfm.adapters import header_of
from fedfm.config import FederationConfig
from fedfm.errors import StorageError
from fedfm.strategies import ServerState, build_strategy
from fedfm.trust.privacy import PrivacyState, new_sampling_key
from fedfm.trust.update_checks import Quarantine

SERVER_STATE_FORMAT = "fedfm-server-state/1"
_SECURE_PREFIX = "secagg."


@dataclass
class RoundState:
    """A server state split by owner: the rule's part, the privacy mechanism's and the quarantine's."""

    rule: ServerState = field(default_factory=dict)
    privacy: PrivacyState = field(default_factory=PrivacyState)
    quarantine: Quarantine = field(default_factory=Quarantine)
    secure: dict = field(default_factory=dict)  # secure aggregation's record of the round, for its evaluation


def read_server_state(cfg: FederationConfig, uri: str | None) -> RoundState:
    """The server state at ``uri`` (None or an empty file: round 1's, empty), split by owner; it must be
    the state of ``cfg``'s aggregation rule."""
    state = load_server_state(uri, build_strategy(cfg.strategy).name) if uri else {}
    privacy, state = PrivacyState.split(state)
    quarantine, state = Quarantine.split(state)
    secure = {key: value for key, value in state.items() if key.startswith(_SECURE_PREFIX)}
    rule = {key: value for key, value in state.items() if not key.startswith(_SECURE_PREFIX)}
    return RoundState(rule=rule, privacy=privacy, quarantine=quarantine, secure=secure)


def write_initial_server_state(cfg: FederationConfig, state_out: str) -> None:
    """The server state before round 1: none, but under differential privacy the secret key that draws each
    round's clients (:func:`fedfm.trust.privacy.poisson_sample`)."""
    if not cfg.privacy.enabled:
        storage.write_bytes(state_out, b"")
        return
    state = PrivacyState(sampling_key=new_sampling_key(cfg))
    save_server_state(state_out, build_strategy(cfg.strategy).name, 0, state.as_state())


def save_server_state(uri: str, strategy: str, round_index: int, state: ServerState) -> None:
    """Write a strategy's server state: its tensors as safetensors, its numbers in the header."""
    tensors = {key: value.detach().to(torch.float32).contiguous() for key, value in state.items()
               if isinstance(value, torch.Tensor)}
    numbers = {key: value for key, value in state.items() if not isinstance(value, torch.Tensor)}
    header = {"format": SERVER_STATE_FORMAT, "strategy": strategy, "round": str(round_index),
              "numbers": json.dumps(numbers, sort_keys=True)}
    storage.write_bytes(uri, safetensors_save(tensors, metadata=header))


def load_server_state(uri: str, strategy: str) -> ServerState:
    """The server state at ``uri``, which must be ``strategy``'s (an empty file is round 1's empty state)."""
    data = storage.read_bytes(uri)
    if not data:
        return {}
    try:
        tensors = safetensors_load(data)
        header = header_of(data) or {}
    except Exception as exc:  # safetensors and json raise several types for damaged bytes
        raise StorageError(f"server state {uri} is damaged: {exc}") from None
    if header.get("format") != SERVER_STATE_FORMAT:
        raise StorageError(f"{uri} is not a FedFM server state (format {header.get('format')!r})")
    if header.get("strategy") != strategy:
        raise StorageError(f"server state {uri} belongs to strategy {header.get('strategy')!r}, not {strategy!r}: "
                           "a run cannot change its strategy midway")
    try:
        numbers = json.loads(header["numbers"])
    except KeyError:
        raise StorageError(f"server state {uri} is damaged: its header has no 'numbers'") from None
    except (ValueError, RecursionError) as exc:
        raise StorageError(f"server state {uri} is damaged: its numbers are not JSON ({exc})") from None
    if not isinstance(numbers, dict):
        raise StorageError(f"server state {uri} is damaged: its numbers are a JSON {type(numbers).__name__}, "
                           "not an object")
    for name, value in sorted(tensors.items()):
        if value.dtype != torch.float32:
            raise StorageError(f"server state {uri} is damaged: tensor {name} is "
                               f"{str(value.dtype).removeprefix('torch.')}, not float32")
    return {**numbers, **tensors}
