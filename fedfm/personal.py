"""What a client keeps and never sends: its personal part of the adapter (FedSA-LoRA's lora_B).

One safetensors file per round under the client's state location
(:meth:`~fedfm.config.FederationConfig.client_state_location`), so a round never overwrites an earlier
one and the state for any round is the newest file at or before it.
"""

from __future__ import annotations

from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from fedfm import storage
from fedfm.adapters import Tensors
from fedfm.config import FederationConfig
from fedfm.errors import ConfigError, FedFMError


def _location(cfg: FederationConfig, client: str) -> str:
    location = cfg.client_state_location(client)
    if location is None:
        raise ConfigError(f"client {client} keeps a personal adapter part but has nowhere to keep it: set its "
                          "state_uri or execution.client_state_uri")
    return location


def save_personal(cfg: FederationConfig, client: str, round_index: int, tensors: Tensors) -> str:
    """Write ``client``'s personal tensors after ``round_index``; returns the URI."""
    uri = f"{_location(cfg, client)}/round-{round_index:04d}.safetensors"
    # a retried round (a Job's second attempt) replaces its own unused first attempt; earlier rounds'
    # files are never touched
    storage.write_bytes(uri, safetensors_save({name: value.contiguous() for name, value in tensors.items()},
                                              metadata={"client": client, "round": str(round_index)}),
                        overwrite=True)
    return uri


def load_personal(cfg: FederationConfig, client: str, round_index: int) -> Tensors:
    """``client``'s personal tensors as of ``round_index`` (its newest file at or before it; none before
    it first trained)."""
    location = _location(cfg, client)
    for earlier in range(round_index, 0, -1):
        uri = f"{location}/round-{earlier:04d}.safetensors"
        if storage.exists(uri):
            try:
                return safetensors_load(storage.read_bytes(uri))
            except Exception as exc:  # safetensors raises several types for damaged bytes
                raise FedFMError(f"client {client}'s personal state {uri} is damaged: {exc}") from None
    return {}
