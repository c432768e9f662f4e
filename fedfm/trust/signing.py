"""Each tenant's signing identity: an Ed25519 key pair whose private half stays in the tenant's state
location and whose public half is registered by the tenant, not by the pipeline (in cluster mode, the
tenant's FederatedClient ``spec.signingKey``; the operator relays the federation's keys).

Secure aggregation signs what a tenant sends with it (its advertised keys, its confirmation of who survived,
its masked update, its revealed shares), so a server that substitutes a peer's keys, a server that tells
clients different survivor sets, and a tenant that writes a message in another's name are all caught, and
named (Bonawitz et al. 2017, https://eprint.iacr.org/2017/281, section 6: the active-adversary variant).

Where a process finds the registry (:func:`registered_keys`): in a tenant's Job, the ``FEDFM_SIGNING_KEYS``
variable the operator sets from the FederatedClients; in a local run (``fedfm run``, ``fedfm simulate``,
the ``local`` execution mode), the public halves beside each client's private one, created on the client's
first secure round (every party of a local run is one user on one machine).
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedfm import storage
from fedfm.errors import ConfigError, SecureAggregationError

IDENTITY_FORMAT = "fedfm-identity/1"
SIGNATURE_FORMAT = b"fedfm-signature/1"
REGISTRY_ENV = "FEDFM_SIGNING_KEYS"
KEY_HEX_CHARS = 64  # an Ed25519 public key: 32 bytes
IDENTITY_FILE = "identity.json"  # in the client's state location: the private half
PUBLIC_FILE = "identity.pub"  # beside it: the public half, what a local run's registry reads

Registry = dict[str, str]  # client name -> hex public key


def new_identity(client: str) -> tuple[bytes, str]:
    """A fresh key pair: (the identity file's bytes, the public key as hex)."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                serialization.NoEncryption())
    identity = {"format": IDENTITY_FORMAT, "client": client, "private": private.hex()}
    return json.dumps(identity, sort_keys=True).encode(), _public_hex(key)


def create_identity(client: str, location: str) -> str:
    """Write a new identity for ``client`` into its state ``location`` (never over an existing one);
    returns the public key to register."""
    identity, public = new_identity(client)
    storage.write_bytes(f"{location}/{IDENTITY_FILE}", identity)
    storage.write_bytes(f"{location}/{PUBLIC_FILE}", public.encode(), overwrite=True)
    return public


def load_identity(client: str, location: str | None, *, create: bool = False) -> Ed25519PrivateKey:
    """``client``'s private signing key from its state ``location``; with ``create`` (a local run), a new
    one when it has none yet."""
    if location is None:
        raise ConfigError(f"client {client} has no state location to keep its signing key in: set its state_uri "
                          "or execution.client_state_uri")
    uri = f"{location}/{IDENTITY_FILE}"
    if not storage.exists(uri):
        if not create:
            raise SecureAggregationError(f"client {client} has no signing identity at {uri}: create one with "
                                         f"`fedfm keygen --client {client} --state {location}` and register its "
                                         "public key in the client's FederatedClient (spec.signingKey)")
        create_identity(client, location)
    try:
        identity = json.loads(storage.read_bytes(uri))
        if identity.get("format") != IDENTITY_FORMAT or identity.get("client") != client:
            raise ValueError(f"it is not a {IDENTITY_FORMAT} identity of client {client}")
        return Ed25519PrivateKey.from_private_bytes(bytes.fromhex(identity["private"]))
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise SecureAggregationError(f"client {client}'s signing identity at {uri} is unreadable ({exc})") from None


def public_key(key: Ed25519PrivateKey) -> str:
    return _public_hex(key)


def registered_keys(clients: Iterable[str], locations: dict[str, str | None]) -> Registry:
    """The registry this process trusts: the operator's (``FEDFM_SIGNING_KEYS``) when it set one, else the
    public halves in the clients' state ``locations`` (a local run). A client without a key is left out,
    and whatever it signs fails verification, naming it."""
    relayed = os.environ.get(REGISTRY_ENV)
    if relayed is not None:
        return parse_registry(relayed, f"${REGISTRY_ENV}")
    registry = {}
    for client in clients:
        location = locations.get(client)
        uri = f"{location}/{PUBLIC_FILE}" if location else None
        if uri and storage.exists(uri):
            registry[client] = storage.read_bytes(uri).decode("ascii", "replace").strip()
    return registry


def parse_registry(text: str, where: str) -> Registry:
    try:
        registry = json.loads(text)
    except ValueError:
        raise ConfigError(f"the signing keys in {where} are not JSON") from None
    if not isinstance(registry, dict) or not all(isinstance(k, str) and valid_public_key(v)
                                                 for k, v in registry.items()):
        raise ConfigError(f"the signing keys in {where} are not a map of client name to a 64-hex-digit key")
    return registry


def valid_public_key(value: Any) -> bool:
    if not isinstance(value, str) or len(value) != KEY_HEX_CHARS:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(value))
    except ValueError:
        return False
    return True


def sign(key: Ed25519PrivateKey, purpose: str, context: bytes, client: str, *parts: bytes) -> str:
    """A hex signature by ``client`` over ``parts`` for ``purpose`` in ``context`` (federation and round):
    a signature made for one purpose, round or client is never valid for another."""
    return key.sign(_message(purpose, context, client, parts)).hex()


def verify(registry: Registry, client: str, signature: Any, purpose: str, context: bytes, *parts: bytes) -> None:
    """Raise, naming ``client``, unless ``signature`` is its registered key's over exactly these parts."""
    public = registry.get(client)
    if public is None:
        raise SecureAggregationError(f"client {client} has no registered signing key: its {purpose} cannot be "
                                     "verified and is refused")
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(public)).verify(
            bytes.fromhex(signature), _message(purpose, context, client, parts))
    except (InvalidSignature, ValueError, TypeError):
        raise SecureAggregationError(f"the {purpose} of client {client} does not carry its registered key's "
                                     "signature: substituted or forged, and refused") from None


def _message(purpose: str, context: bytes, client: str, parts: tuple[bytes, ...]) -> bytes:
    fields = (SIGNATURE_FORMAT, purpose.encode(), context, client.encode(), *parts)
    return b"".join(len(field).to_bytes(4, "big") + field for field in fields)


def _public_hex(key: Ed25519PrivateKey) -> str:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()
