"""Secure aggregation (Bonawitz et al. 2017, https://eprint.iacr.org/2017/281), semi-honest variant: the pure core.

The server learns the sum of the clients' updates and nothing else about them: each client adds masks to its
fixed-point update that cancel in the sum, so a masked update seen alone is uniformly random in Z_{2^64}.

A round, per client ``u`` (every message is bytes or JSON-able, so it can travel through file storage):

1. :func:`advertise` — two fresh X25519 key pairs: ``c`` encrypts the shares sent to peers, ``s`` agrees a
   pairwise mask seed with each peer. The public halves go to the server, signed with the client's
   registered signing key (:mod:`fedfm.trust.signing`); U1 is the set that advertised.
2. :func:`share_keys` — a fresh self-mask seed ``b_u``; ``b_u`` and ``s_sk_u`` are Shamir-shared t-of-|U1|
   over GF(2^521 − 1), and each peer's shares go to it AES-GCM-encrypted (the server only relays them).
   U2 is the set that sent shares.
3. :func:`mask` — ``y_u = x_u + PRG(b_u) + Σ_{v∈U2, v≠u} ±PRG(s_uv)`` mod 2^64 (``+`` when ``u < v``); the
   pairwise terms cancel in a sum over all of U2. U3 is the set whose masked input reached the server.
4. :func:`confirm` — the consistency check: the client signs the survivor set U3 the server announced.
5. :func:`reveal` — given at least ``t`` confirmations of the same U3, signed by its members, for each ``v``
   in U2 the share of ``b_v`` if ``v`` survived (is in U3), else the share of ``s_sk_v`` (``v`` dropped after
   sharing, so the server must remove the pairwise masks it left behind).
6. Server: :func:`add_masked` sums the masked inputs as they arrive, :func:`unmask` reconstructs the seeds
   from any ``t`` responders and removes the masks, giving ``Σ_{u∈U3} x_u`` mod 2^64.
7. After the round, :func:`mask_evaluation` — each survivor's evaluation counts of the round's adapter, with
   pairwise masks only (keys derived apart from the update's): the sum over all of U3 is the counts' sum,
   and with any survivor's answer missing nothing is readable (no self-mask, nothing revealed for it).

:func:`encode` and :func:`decode` move tensors in and out of the ring (signed fixed point, ``fraction_bits``).

A ``context`` (e.g. ``b"federation/round-3"``) enters every key derivation and every ciphertext's associated
data, so nothing from one round or federation is accepted in another.

Threat model. Covered: a server that reads everything it relays and stores, and up to t − 1 colluding
clients, with or without the server: together they learn nothing about the other clients' inputs beyond
the sum of the survivors' (U3) inputs. A client reveals, for each peer, either the share of its self-mask
seed or the share of its mask key, never both, so no coalition below ``t`` can unmask a single input.
Against a server that does not follow the protocol (the paper's active-adversary variant, its section 6):

- every advertisement is signed with its client's registered key and verified by every peer, so the server
  cannot substitute its own keys for a peer's (which would let it decrypt the shares sent to that peer);
  the shares themselves are authenticated encryption under keys only the two signed parties can derive;
- before revealing, a client needs ``t`` signatures of members of U3 over the very U3 it was given, and it
  signs one survivor set per round (:func:`confirm`): a server that tells some clients ``v`` survived and
  others that it dropped, to collect both kinds of shares of ``v``, cannot gather ``t`` confirmations of both
  sets while ``2t`` exceeds |U2| plus the clients colluding with it (the default threshold, a majority of
  the round's clients, guarantees that without collusion). The caller must still run :func:`reveal` at most
  once per client and round, and the server must not accept a masked input after announcing U3.

Not covered:

- Malicious clients sending garbage: the sum is then garbage. Norm or sanity checks cannot see inside
  masked values; only the decoded aggregate can be checked.
- Privacy of the sum itself: the server learns the exact sum of the survivors (with two survivors and
  one of them colluding, the other's input). Differential privacy is what protects that.
- Denial of service: below ``t`` clients no aggregate is produced (by design), and a client can always
  make a round fail by not answering.

Arithmetic is numpy uint64, which wraps mod 2^64; a decoded sum is correct while its magnitude times
2^fraction_bits stays below 2^63 (:func:`encode` bounds each value at 2^62, the caller bounds the count).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedfm.errors import SecureAggregationError
from fedfm.trust import signing

if TYPE_CHECKING:
    import torch

FORMAT = "fedfm-secagg/1"
PRIME = 2**521 - 1  # a Mersenne prime above every 256-bit secret, so a secret is one field element
MAX_MAGNITUDE_BITS = 62  # |x|·2^bits stays below 2^62: the sum of two extreme values still decodes signed
KEY_BYTES = 32
NONCE_BYTES = 12
_ADVERTISED = "advertised keys"  # what each signature is for (signing.sign's purpose)
_CONFIRMED = "confirmation of the survivors"

Layout = list[tuple[str, tuple[int, ...]]]
Share = dict[str, Any]  # {"x": evaluation point (1-based index in sorted U1), "y": hex field element}


# --- fixed point in Z_{2^64} -------------------------------------------------------------------------


def encode(tensors: dict[str, torch.Tensor], fraction_bits: int) -> tuple[np.ndarray, Layout]:
    """Flatten ``tensors`` (sorted by name) into round(x·2^fraction_bits) as uint64 two's complement.

    Refuses a value that is not finite or whose magnitude does not fit (|x|·2^bits ≥ 2^62), naming the
    tensor, since wrapping around the ring would silently turn it into a huge value of the other sign.
    """
    import torch

    _check_fraction_bits(fraction_bits)
    scale, limit = float(2**fraction_bits), float(2**MAX_MAGNITUDE_BITS)
    parts: list[np.ndarray] = []
    layout: Layout = []
    for name in sorted(tensors):
        tensor = tensors[name]
        scaled = tensor.detach().to("cpu", torch.float64).numpy().ravel() * scale
        if scaled.size and not np.isfinite(scaled).all():
            raise SecureAggregationError(f"tensor {name!r} holds a non-finite value; it cannot be encoded")
        if scaled.size and np.abs(scaled).max() >= limit:
            largest = float(np.abs(scaled).max()) / scale
            raise SecureAggregationError(
                f"tensor {name!r} holds a value of magnitude {largest:.6g}, which does not fit the fixed-point "
                f"ring at {fraction_bits} fraction bits (limit 2^{MAX_MAGNITUDE_BITS - fraction_bits})")
        parts.append(np.rint(scaled).astype(np.int64).view(np.uint64))
        layout.append((name, tuple(int(d) for d in tensor.shape)))
    vector = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint64)
    return vector, layout


def decode(vector: np.ndarray, layout: Iterable[tuple[str, Iterable[int]]], fraction_bits: int
           ) -> dict[str, torch.Tensor]:
    """Float32 tensors back from a ring vector, reading each element as a signed (two's complement) value.

    ``layout`` may have been through JSON (shapes as lists).
    """
    import torch

    _check_fraction_bits(fraction_bits)
    vector = _check_vector(vector, "the vector to decode")
    entries = [(str(name), tuple(int(d) for d in shape)) for name, shape in layout]
    sizes = [math.prod(shape) for _, shape in entries]
    if sum(sizes) != vector.size:
        raise SecureAggregationError(f"the vector has {vector.size} elements but its layout describes {sum(sizes)}")
    values = vector.view(np.int64).astype(np.float64) / float(2**fraction_bits)
    tensors: dict[str, torch.Tensor] = {}
    offset = 0
    for (name, shape), size in zip(entries, sizes):
        tensors[name] = torch.from_numpy(values[offset:offset + size].astype(np.float32)).reshape(shape)
        offset += size
    return tensors


def vector_to_bytes(vector: np.ndarray) -> bytes:
    """A ring vector as little-endian bytes (8 per element), the form a masked input travels in."""
    return _check_vector(vector, "the vector").astype("<u8", copy=False).tobytes()


def vector_from_bytes(data: bytes) -> np.ndarray:
    """The inverse of :func:`vector_to_bytes` (a writable native uint64 array)."""
    if len(data) % 8:
        raise SecureAggregationError(f"{len(data)} bytes are not a whole number of 8-byte ring elements")
    return np.frombuffer(data, dtype="<u8").astype(np.uint64)


def _check_fraction_bits(fraction_bits: int) -> None:
    if not isinstance(fraction_bits, int) or not 0 <= fraction_bits < MAX_MAGNITUDE_BITS:
        raise SecureAggregationError(f"fraction_bits must be an integer in [0, {MAX_MAGNITUDE_BITS}), "
                                     f"not {fraction_bits!r}")


def _check_vector(vector: Any, what: str) -> np.ndarray:
    """A 1-D native uint64 array: anything else would not wrap mod 2^64 the way the masks need."""
    if not isinstance(vector, np.ndarray) or vector.ndim != 1 or vector.dtype.kind != "u" or vector.itemsize != 8:
        described = f"{vector.dtype} array of shape {vector.shape}" if isinstance(vector, np.ndarray) else type(vector)
        raise SecureAggregationError(f"{what} must be a 1-D uint64 array, not a {described}")
    return np.ascontiguousarray(vector, dtype=np.uint64)


# --- client: the four rounds ---------------------------------------------------------------------------


def advertise(client: str, signing_key: Ed25519PrivateKey, context: bytes) -> tuple[bytes, dict]:
    """Round 0: fresh key pairs for this round; returns (private state, public message for the server),
    the message signed with the client's ``signing_key`` for ``context``.

    Keys are never reused across rounds, so a share revealed in one round says nothing about another.
    """
    _check_name(client)
    _check_context(context)
    c_sk, s_sk = _new_private_key(), _new_private_key()
    c_pk, s_pk = _public_of(c_sk), _public_of(s_sk)
    state = {"format": FORMAT, "client": client, "c_sk": c_sk.hex(), "s_sk": s_sk.hex(), "context": context.hex()}
    message = {"client": client, "c_pk": c_pk.hex(), "s_pk": s_pk.hex(),
               "signature": signing.sign(signing_key, _ADVERTISED, context, client, c_pk, s_pk)}
    return _dump_state(state), message


def share_keys(client: str, private: bytes, public: dict[str, dict], threshold: int, context: bytes,
               registry: signing.Registry) -> tuple[bytes, dict[str, str]]:
    """Round 1: Shamir-share a fresh self-mask seed b_u and the mask key s_sk_u among U1 (``public``).

    Returns the private state (now holding b_u) and, for each other participant, the ciphertext addressed
    to it: AES-GCM under a key derived from X25519(c_sk_u, c_pk_v) and ``context``, holding
    (u, v, share of b_u, share of s_sk_u). Every advertisement must carry its client's signature under
    ``registry`` (client → public key), or nothing is shared.
    """
    state = _load_state(client, private)
    if "b" in state:
        raise SecureAggregationError(f"client {client!r} has already shared its keys this round")
    _check_context(context)
    if state["context"] != context.hex():
        raise SecureAggregationError(f"the private state of {client!r} belongs to another round or federation")
    keys = _parse_public(public, registry, context)
    _check_own_keys(client, state, keys)
    if not isinstance(threshold, int) or threshold < 2:
        raise SecureAggregationError(f"the threshold must be an integer of at least 2, not {threshold!r}")
    if len(keys) < threshold:
        raise SecureAggregationError(f"only {len(keys)} clients advertised keys, below the threshold of "
                                     f"{threshold}; client {client!r} shares nothing")
    if 2 * threshold <= len(keys):
        raise SecureAggregationError(f"a threshold of {threshold} among {len(keys)} clients is not a majority: the "
                                     "server could collect both kinds of shares of one client from two halves; "
                                     f"client {client!r} shares nothing")
    participants = sorted(keys)
    index = {name: position + 1 for position, name in enumerate(participants)}
    seed = _random_bytes(KEY_BYTES)
    b_shares = _share_secret(int.from_bytes(seed, "big"), threshold, index.values())
    s_shares = _share_secret(int.from_bytes(bytes.fromhex(state["s_sk"]), "big"), threshold, index.values())
    ciphertexts = {}
    for peer in participants:
        if peer != client:
            x = index[peer]
            payload = {"from": client, "to": peer, "b": _share(x, b_shares[x]), "s_sk": _share(x, s_shares[x])}
            ciphertexts[peer] = _encrypt(state, keys[peer], client, peer, payload, context).hex()
    own = index[client]
    state.update(threshold=threshold, participants=participants, b=seed.hex(), own_b_share=_share(own, b_shares[own]))
    return _dump_state(state), ciphertexts


def mask(client: str, private: bytes, public: dict[str, dict], vector: np.ndarray, context: bytes,
         registry: signing.Registry) -> np.ndarray:
    """Round 2: ``y_u = x_u + PRG(b_u) + Σ_{v∈U2, v≠u} ±PRG(s_uv)`` mod 2^64 (``+`` when u < v).

    ``public`` is U2, the clients that sent shares: masks with clients that dropped earlier would never be
    removed, since nobody holds shares of their keys.
    """
    state = _load_shared_state(client, private, context)
    keys = _parse_public(public, registry, context)
    _check_own_keys(client, state, keys)
    _check_within(keys, state["participants"], "sent shares (U2)", "advertised keys (U1)")
    if len(keys) < state["threshold"]:
        raise SecureAggregationError(f"only {len(keys)} clients sent shares, below the threshold of "
                                     f"{state['threshold']}; client {client!r} sends no masked input")
    masked = _check_vector(vector, f"the input of client {client!r}").copy()
    masked += _prg(_self_mask_key(bytes.fromhex(state["b"]), client, context), masked.size)
    for peer in sorted(keys):
        if peer != client:
            stream = _prg(_pairwise_key(state["s_sk"], keys[peer], client, peer, context), masked.size)
            if client < peer:
                masked += stream
            else:
                masked -= stream
    return masked


def confirm(client: str, private: bytes, public: dict[str, dict], survivors: list[str], context: bytes,
            signing_key: Ed25519PrivateKey, registry: signing.Registry) -> tuple[bytes, str]:
    """Round 3, the consistency check: sign the survivor set U3 the server announced, once per round.

    Returns the private state (now recording U3) and the signature. A client confirms one survivor set only:
    asked to confirm another (the server telling clients different stories about who dropped), it refuses.
    """
    state = _load_shared_state(client, private, context)
    alive, _ = _check_survivors(client, state, public, survivors, context, registry)
    if state.get("confirmed", alive) != alive:
        raise SecureAggregationError(f"client {client!r} already confirmed the survivors {state['confirmed']} this "
                                     f"round; it does not confirm {alive} too")
    state["confirmed"] = alive
    return _dump_state(state), signing.sign(signing_key, _CONFIRMED, context, client, _names(alive))


def check_advertisement(client: str, message: Any, context: bytes, registry: signing.Registry) -> None:
    """What the server checks of an advertisement before relaying it: well formed, ``client``'s, and signed by
    its key in ``registry`` for ``context``."""
    if not isinstance(message, dict) or message.get("client") != client:
        raise SecureAggregationError(f"the keys advertised for client {client} are not its own")
    _parse_public({client: message}, registry, context)


def verify_confirmation(client: str, signature: Any, survivors: list[str], context: bytes,
                        registry: signing.Registry) -> None:
    """What the server checks of a confirmation before relaying it: ``client``'s signature over ``survivors``."""
    signing.verify(registry, client, signature, _CONFIRMED, context, _names(survivors))


def reveal(client: str, private: bytes, public: dict[str, dict], ciphertexts: dict[str, str],
           survivors: list[str], confirmations: dict[str, str], context: bytes,
           registry: signing.Registry) -> dict[str, dict]:
    """Round 4: for every v in U2 (``public``), the share of b_v if v is in U3 (``survivors``), else of s_sk_v.

    ``private`` is the state :func:`confirm` returned: the client reveals only for the survivor set it
    confirmed, and only once ``confirmations`` holds at least the threshold of signatures over that same
    set by its members (each verified under ``registry``; one that fails names its client). ``ciphertexts``
    maps each other member of U2 to the ciphertext it addressed to this client. Never both kinds of share
    for one peer: both would unmask v's input. The caller must run this once per round (see the module's
    threat model).
    """
    state = _load_shared_state(client, private, context)
    alive, keys = _confirmed_survivors(client, state, public, survivors, confirmations, context, registry, "reveals")
    unknown = sorted(set(ciphertexts) - set(keys))
    if unknown:
        raise SecureAggregationError(f"ciphertexts from {unknown}, which are in neither U2 nor U3")
    revealed: dict[str, dict] = {client: {"b": state["own_b_share"]}}
    for peer in sorted(keys):
        if peer == client:
            continue
        if peer not in ciphertexts:
            raise SecureAggregationError(f"client {peer!r} is in U2 but no ciphertext from it reached {client!r}")
        payload = _decrypt(state, keys[peer], peer, client, ciphertexts[peer], context)
        revealed[peer] = {"b": payload["b"]} if peer in alive else {"s_sk": payload["s_sk"]}
    return revealed


def mask_evaluation(client: str, private: bytes, public: dict[str, dict], survivors: list[str],
                    confirmations: dict[str, str], vector: np.ndarray, context: bytes,
                    registry: signing.Registry) -> np.ndarray:
    """After the round: ``z_u = e_u + Σ_{v∈U3, v≠u} ±PRG(e_uv)`` mod 2^64, ``e_u`` the client's evaluation
    counts of the round's adapter and ``e_uv`` a key derived from the pair's agreed secret apart from the
    update's mask key.

    The masks cancel in the sum over every survivor and in no smaller one, and nothing is ever revealed for
    them (no self-mask, no shares): with a survivor's answer missing, the others' counts stay masked and the
    server learns nothing. The survivors must be the set the client confirmed, with the threshold of its
    members' confirmations (as :func:`reveal` requires), so the server cannot shrink the set to colluders. A
    survivor's mask key ``s_sk`` is never revealed, so neither are these masks. The caller must mask one
    evaluation per client and round: two under the same masks would give the server their difference.
    """
    state = _load_shared_state(client, private, context)
    alive, keys = _confirmed_survivors(client, state, public, survivors, confirmations, context, registry,
                                       "evaluates")
    masked = _check_vector(vector, f"the evaluation of client {client!r}").copy()
    for peer in alive:
        if peer != client:
            stream = _prg(_pairwise_key(state["s_sk"], keys[peer], client, peer, context, b"evaluation-mask"),
                          masked.size)
            if client < peer:
                masked += stream
            else:
                masked -= stream
    return masked


def _confirmed_survivors(client: str, state: dict, public: dict[str, dict], survivors: list[str],
                         confirmations: dict[str, str], context: bytes, registry: signing.Registry,
                         verb: str) -> tuple[list[str], dict[str, _PublicKeys]]:
    """U3 as the client confirmed it, once at least the threshold of its members signed that same set (each
    signature verified under ``registry``; one that fails names its client); and U2's keys."""
    alive, keys = _check_survivors(client, state, public, survivors, context, registry)
    if state.get("confirmed") != alive:
        raise SecureAggregationError(f"client {client!r} {verb} only for the survivor set it confirmed "
                                     f"({state.get('confirmed')}), not for {alive}")
    if not isinstance(confirmations, dict):
        raise SecureAggregationError(f"the confirmations handed to {client!r} are not a map of client to signature")
    _check_within(confirmations, alive, "confirmed the survivors", "survived (U3)")
    for signer, signature in sorted(confirmations.items()):
        signing.verify(registry, signer, signature, _CONFIRMED, context, _names(alive))
    if len(confirmations) < state["threshold"]:
        raise SecureAggregationError(f"only {len(confirmations)} survivors confirmed the survivor set, below the "
                                     f"threshold of {state['threshold']}; client {client!r} {verb} nothing")
    return alive, keys


def _check_survivors(client: str, state: dict, public: dict[str, dict], survivors: list[str], context: bytes,
                     registry: signing.Registry) -> tuple[list[str], dict[str, _PublicKeys]]:
    """U3, sorted, once it is within U2 (``public``, signed), at least the threshold, and holds ``client``;
    and U2's keys."""
    keys = _parse_public(public, registry, context)
    _check_own_keys(client, state, keys)
    _check_within(keys, state["participants"], "sent shares (U2)", "advertised keys (U1)")
    if not isinstance(survivors, list) or not all(isinstance(name, str) for name in survivors):
        raise SecureAggregationError(f"the survivors handed to {client!r} are not a list of client names")
    alive = sorted(set(survivors))
    _check_within(alive, keys, "survived (U3)", "sent shares (U2)")
    if len(alive) < state["threshold"]:
        raise SecureAggregationError(f"only {len(alive)} clients survived, below the threshold of "
                                     f"{state['threshold']}; client {client!r} reveals nothing")
    if client not in alive:
        raise SecureAggregationError(f"client {client!r} is not among the survivors it is asked to reveal for")
    return alive, keys


def _names(names: list[str]) -> bytes:
    return json.dumps(sorted(names)).encode()


# --- server ----------------------------------------------------------------------------------------------


def add_masked(acc: np.ndarray | None, vector: np.ndarray) -> np.ndarray:
    """Add one masked input to the running sum mod 2^64 (in place; ``acc=None`` starts a sum), so the
    server holds one vector however many clients send."""
    vector = _check_vector(vector, "a masked input")
    if acc is None:
        return vector.copy()
    acc = _check_vector(acc, "the masked sum")
    if acc.shape != vector.shape:
        raise SecureAggregationError(f"a masked input of {vector.size} elements cannot join a sum of {acc.size}")
    np.add(acc, vector, out=acc)
    return acc


def unmask(masked_sum: np.ndarray, public: dict[str, dict], survivors: list[str],
           revealed: dict[str, dict[str, dict]], threshold: int, context: bytes,
           registry: signing.Registry) -> np.ndarray:
    """Remove the masks from ``Σ_{u∈U3} y_u`` and return ``Σ_{u∈U3} x_u`` mod 2^64.

    ``public`` is U2, ``survivors`` U3, ``revealed`` each responding client's :func:`reveal` output. Needs
    ``threshold`` responders; reconstructs b_u of every survivor and s_sk_v of every client that dropped
    after sharing. A reconstructed s_sk_v must match v's advertised public key; b_u has no public
    counterpart, so its shares are checked only when more than ``threshold`` responders answered (every
    further share must lie on the polynomial the first ``threshold`` define).
    """
    _check_context(context)
    total = _check_vector(masked_sum, "the masked sum").copy()
    keys = _parse_public(public, registry, context)
    alive = set(survivors)
    _check_within(alive, keys, "survived (U3)", "sent shares (U2)")
    _check_within(revealed, alive, "revealed shares", "survived (U3)")
    if not isinstance(threshold, int) or threshold < 2:
        raise SecureAggregationError(f"the threshold must be an integer of at least 2, not {threshold!r}")
    if len(alive) < threshold or len(revealed) < threshold:
        raise SecureAggregationError(f"below threshold: {len(alive)} clients survived and {len(revealed)} revealed "
                                     f"shares, {threshold} needed; no aggregate is produced")
    seeds = {name: _recover(name, "b" if name in alive else "s_sk", revealed, threshold) for name in sorted(keys)}
    for name in sorted(alive):
        total -= _prg(_self_mask_key(seeds[name], name, context), total.size)
    for dropped in sorted(set(keys) - alive):
        s_sk = seeds[dropped]
        if _public_of(s_sk) != keys[dropped].s_pk:
            raise SecureAggregationError(f"the shares of the mask key of {dropped!r} reconstruct a key that does not "
                                         f"match its advertised public key; the shares are inconsistent")
        for survivor in sorted(alive):
            stream = _prg(_pairwise_key(s_sk.hex(), keys[survivor], dropped, survivor, context), total.size)
            if survivor < dropped:  # the survivor added this stream, so take it away, and vice versa
                total -= stream
            else:
                total += stream
    return total


def _recover(owner: str, kind: str, revealed: dict[str, dict[str, dict]], threshold: int) -> bytes:
    """The 32-byte secret (``kind`` b or s_sk) of ``owner`` from the responders' shares."""
    shares: dict[int, int] = {}
    for responder, answer in sorted(revealed.items()):
        entry = answer.get(owner) if isinstance(answer, dict) else None
        if entry is None:
            continue
        if not isinstance(entry, dict) or set(entry) != {kind}:
            given = sorted(entry) if isinstance(entry, dict) else entry
            raise SecureAggregationError(f"client {responder!r} revealed {given!r} for {owner!r}, where exactly "
                                         f"its {kind!r} share was due")
        x, y = _parse_share(entry[kind], f"the {kind} share of {owner!r} from {responder!r}")
        if shares.get(x, y) != y:
            raise SecureAggregationError(f"two different shares of {owner!r} at the same point {x}; the shares "
                                         f"of {owner!r} are inconsistent")
        shares[x] = y
    if len(shares) < threshold:
        raise SecureAggregationError(f"below threshold: only {len(shares)} shares of {owner!r}, {threshold} needed; "
                                     f"no aggregate is produced")
    secret = _reconstruct(shares, threshold, owner)
    if secret >= 1 << (8 * KEY_BYTES):
        raise SecureAggregationError(f"the shares of {owner!r} reconstruct no {KEY_BYTES}-byte secret; the shares "
                                     f"of {owner!r} are inconsistent")
    return secret.to_bytes(KEY_BYTES, "big")


# --- Shamir secret sharing over GF(2^521 - 1) ------------------------------------------------------------


def _share_secret(secret: int, threshold: int, points: Iterable[int]) -> dict[int, int]:
    """f(x) at each point, for a random f of degree threshold − 1 with f(0) = secret: any threshold − 1
    shares are uniformly distributed whatever the secret."""
    coefficients = [secret] + [_random_field_element() for _ in range(threshold - 1)]
    shares = {}
    for x in points:
        y = 0
        for coefficient in reversed(coefficients):
            y = (y * x + coefficient) % PRIME
        shares[x] = y
    return shares


def _reconstruct(shares: dict[int, int], threshold: int, owner: str) -> int:
    """f(0) from the first ``threshold`` shares; every further share must lie on the same polynomial."""
    points = sorted(shares)
    basis = tuple(points[:threshold])
    secret = _interpolate(basis, [shares[x] for x in basis], 0)
    for x in points[threshold:]:
        if _interpolate(basis, [shares[b] for b in basis], x) != shares[x]:
            raise SecureAggregationError(f"the shares of {owner!r} do not lie on one polynomial; the shares of "
                                         f"{owner!r} are inconsistent")
    return secret


def _interpolate(basis: tuple[int, ...], values: list[int], at: int) -> int:
    return sum(weight * value for weight, value in zip(_lagrange_weights(basis, at), values)) % PRIME


@lru_cache(maxsize=4096)
def _lagrange_weights(basis: tuple[int, ...], at: int) -> tuple[int, ...]:
    """Weights w_i with f(at) = Σ w_i·f(basis_i) for every f of degree < len(basis); cached because the
    server interpolates every client's secret from the same responders."""
    weights = []
    for i, xi in enumerate(basis):
        numerator, denominator = 1, 1
        for j, xj in enumerate(basis):
            if j != i:
                numerator = numerator * (at - xj) % PRIME
                denominator = denominator * (xi - xj) % PRIME
        weights.append(numerator * pow(denominator, -1, PRIME) % PRIME)
    return tuple(weights)


def _random_field_element() -> int:
    """Uniform in [0, PRIME) by rejection (a plain modulo would bias the shares)."""
    while True:
        value = int.from_bytes(_random_bytes(66), "big") & ((1 << 521) - 1)
        if value < PRIME:
            return value


def _share(x: int, y: int) -> Share:
    return {"x": x, "y": format(y, "x")}


def _parse_share(share: Any, what: str) -> tuple[int, int]:
    try:
        x, y = share["x"], int(share["y"], 16)
    except (TypeError, KeyError, ValueError):
        raise SecureAggregationError(f"{what} is not a share ({share!r:.80})") from None
    if not isinstance(x, int) or not 0 < x < PRIME or not 0 <= y < PRIME:
        raise SecureAggregationError(f"{what} is out of range")
    return x, y


# --- keys, key derivation, encryption, PRG --------------------------------------------------------------


@dataclass(frozen=True)
class _PublicKeys:
    c_pk: bytes
    s_pk: bytes


def _random_bytes(count: int) -> bytes:
    """The one source of randomness (keys, seeds, share polynomials, nonces); tests replace it with a seeded one."""
    return os.urandom(count)


def _new_private_key() -> bytes:
    """Raw X25519 private key bytes (clamping happens when the key is used)."""
    return _random_bytes(KEY_BYTES)


def _public_of(private_key: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private_key).public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _agree(private_hex: str, peer_public: bytes, peer: str) -> bytes:
    try:
        private_key = X25519PrivateKey.from_private_bytes(bytes.fromhex(private_hex))
        return private_key.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:
        raise SecureAggregationError(f"key agreement with {peer!r} failed ({exc})") from None


def _frame(*parts: bytes) -> bytes:
    """Length-prefixed concatenation: no two different tuples of parts give the same bytes."""
    return b"".join(len(part).to_bytes(4, "big") + part for part in parts)


def _derive(secret: bytes, label: bytes, context: bytes, *names: str) -> bytes:
    info = _frame(FORMAT.encode(), label, context, *(name.encode() for name in names))
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(secret)


def _self_mask_key(seed: bytes, client: str, context: bytes) -> bytes:
    return _derive(seed, b"self-mask", context, client)


def _pairwise_key(own_s_sk_hex: str, peer_keys: _PublicKeys, own: str, peer: str, context: bytes,
                  label: bytes = b"pairwise-mask") -> bytes:
    """s_uv: the same for (u, v) and (v, u), since X25519 is symmetric and the names enter sorted; ``label``
    keeps the update's masks and the evaluation's apart."""
    return _derive(_agree(own_s_sk_hex, peer_keys.s_pk, peer), label, context, *sorted((own, peer)))


def _share_key(own_state: dict, peer_keys: _PublicKeys, peer: str, sender: str, recipient: str,
               context: bytes) -> bytes:
    """One key per direction (sender, recipient) and round, so a ciphertext cannot be reflected back."""
    return _derive(_agree(own_state["c_sk"], peer_keys.c_pk, peer), b"share-encryption", context, sender, recipient)


def _associated_data(context: bytes, sender: str, recipient: str) -> bytes:
    return _frame(context, sender.encode(), recipient.encode())


def _encrypt(state: dict, peer_keys: _PublicKeys, sender: str, recipient: str, payload: dict, context: bytes) -> bytes:
    key = _share_key(state, peer_keys, recipient, sender, recipient, context)
    nonce = _random_bytes(NONCE_BYTES)
    plaintext = json.dumps(payload, sort_keys=True).encode()
    return nonce + AESGCM(key).encrypt(nonce, plaintext, _associated_data(context, sender, recipient))


def _decrypt(state: dict, peer_keys: _PublicKeys, sender: str, recipient: str, ciphertext_hex: str,
             context: bytes) -> dict:
    """The payload ``sender`` addressed to ``recipient``; any tampering, or another round's context, fails
    authentication and names the sender."""
    key = _share_key(state, peer_keys, sender, sender, recipient, context)
    try:
        data = bytes.fromhex(ciphertext_hex)
        plaintext = AESGCM(key).decrypt(data[:NONCE_BYTES], data[NONCE_BYTES:],
                                        _associated_data(context, sender, recipient))
        payload = json.loads(plaintext)
    except (TypeError, ValueError, InvalidTag):
        raise SecureAggregationError(f"the ciphertext from {sender!r} to {recipient!r} fails authentication "
                                     f"(tampered, or from another round or federation)") from None
    if not isinstance(payload, dict) or payload.get("from") != sender or payload.get("to") != recipient:
        raise SecureAggregationError(f"the ciphertext from {sender!r} to {recipient!r} names other parties")
    return payload


_zeros = b""


def _prg(key: bytes, length: int) -> np.ndarray:
    """AES-256-CTR keystream (zero IV: each key is used for one stream) as ``length`` little-endian uint64."""
    global _zeros
    if len(_zeros) < 8 * length:  # kept between calls: fresh zero pages cost 6× the encryption itself
        _zeros = bytes(8 * length)
    encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    return np.frombuffer(encryptor.update(memoryview(_zeros)[:8 * length]), dtype="<u8")


# --- messages and state ----------------------------------------------------------------------------------


def _check_name(client: Any) -> None:
    if not isinstance(client, str) or not client:
        raise SecureAggregationError(f"a client name must be a non-empty string, not {client!r}")


def _check_context(context: Any) -> None:
    if not isinstance(context, bytes) or not context:
        raise SecureAggregationError(f"the context must be non-empty bytes (e.g. b'federation/round-3'), "
                                     f"not {context!r:.80}")


def _parse_public(public: dict[str, dict], registry: signing.Registry, context: bytes) -> dict[str, _PublicKeys]:
    """Each advertise message, checked to carry its own name, two 32-byte public keys, and its client's
    signature over them for ``context`` (a substituted key fails, naming the client)."""
    if not isinstance(public, dict):
        raise SecureAggregationError(f"the advertised keys must be a dict of client to message, not {type(public)}")
    keys = {}
    for name, message in public.items():
        _check_name(name)
        try:
            if message["client"] != name:
                raise ValueError(f"it names {message['client']!r}")
            c_pk, s_pk = bytes.fromhex(message["c_pk"]), bytes.fromhex(message["s_pk"])
            if len(c_pk) != KEY_BYTES or len(s_pk) != KEY_BYTES:
                raise ValueError("a public key is not 32 bytes")
        except (TypeError, KeyError, ValueError) as exc:
            raise SecureAggregationError(f"the advertised keys of {name!r} are malformed ({exc})") from None
        signing.verify(registry, name, message.get("signature"), _ADVERTISED, context, c_pk, s_pk)
        keys[name] = _PublicKeys(c_pk, s_pk)
    return keys


def _check_own_keys(client: str, state: dict, keys: dict[str, _PublicKeys]) -> None:
    """The client's entry in the set must be its own keys: anything else means a mixed-up round."""
    own = keys.get(client)
    if own is None:
        raise SecureAggregationError(f"client {client!r} is not in the set of clients it was handed")
    if own.c_pk != _public_of(bytes.fromhex(state["c_sk"])) or own.s_pk != _public_of(bytes.fromhex(state["s_sk"])):
        raise SecureAggregationError(f"the keys advertised for {client!r} are not the ones in its private state")


def _check_within(names: Iterable[str], allowed: Iterable[str], what: str, within: str) -> None:
    outside = sorted(set(names) - set(allowed))
    if outside:
        raise SecureAggregationError(f"clients {outside} {what} but are not among those that {within}")


def _dump_state(state: dict) -> bytes:
    return json.dumps(state, sort_keys=True).encode()


def _load_state(client: str, private: bytes) -> dict:
    _check_name(client)
    try:
        state = json.loads(private)
    except (TypeError, ValueError):
        raise SecureAggregationError(f"the private state of {client!r} is unreadable") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise SecureAggregationError(f"the private state of {client!r} is not a {FORMAT} state")
    if state.get("client") != client:
        raise SecureAggregationError(f"the private state handed to {client!r} belongs to {state.get('client')!r}")
    return state


def _load_shared_state(client: str, private: bytes, context: bytes) -> dict:
    """A state after :func:`share_keys`, of this round."""
    _check_context(context)
    state = _load_state(client, private)
    if "b" not in state:
        raise SecureAggregationError(f"client {client!r} has not shared its keys yet this round")
    if state["context"] != context.hex():
        raise SecureAggregationError(f"the private state of {client!r} belongs to another round or federation")
    return state
