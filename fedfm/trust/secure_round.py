"""One round under secure aggregation, as steps that exchange files: the protocol of :mod:`fedfm.trust.secagg`
carried over the same storage as updates.

Client steps (each runs where the client's data is, and keeps its secrets in its own state location,
``cfg.client_state_location(client)``, which the server never reads):

1. :func:`advertise` — fresh key pairs; the public keys go to the server.
2. :func:`share` — given every advertised key (U1), encrypted Shamir shares of its seeds for each peer.
3. :func:`mask` — given who shared (U2), its update as a fixed-point vector with masks that cancel in
   the sum. The plain update stays in the client's state location; only the masked one is sent.
4. :func:`confirm` — given who sent a masked update (U3), its signature over that set (the consistency check).
5. :func:`reveal` — given U3 and at least the threshold of its members' confirmations of it, the shares
   that let the server remove the masks: of each survivor's self-mask seed and of each dropped client's
   mask key, never both.
6. :func:`evaluate` — after the round, its evaluation counts of the round's global adapter, masked among
   U3 (:func:`fedfm.trust.secagg.mask_evaluation`), once per round: the server reads only their sum over
   every survivor (:func:`sum_evaluations`), never a tenant's counts.

Every message a client sends is signed with its registered key (:mod:`fedfm.trust.signing`), and every
receiver, peer or server, verifies it against the registry it trusts: a substituted key, a forged masked
update or a forged share is refused and names the client.

Server steps: :func:`relay_keys`, :func:`relay_shares` (which passes each client its inbox of ciphertexts),
:func:`sum_masked`, :func:`relay_confirmations` and :func:`finish`, which unmasks the sum, turns it into the
round's mean update, and runs the strategy on it (a rule that works from the mean: ``Strategy.from_mean``);
it also records in the server state what the round's evaluation needs (:data:`EVALUATION_STATE`), which
:func:`sum_evaluations` then adds up.

What a client contributes: without differential privacy, ``n·Δ`` and ``n`` (its sample count), so that
the server learns ``Σ nΔ / Σ n`` and not who had how many samples. With differential privacy the noise
must be in the sum before the server sees it, so each client clips ``Δ`` to C and adds Gaussian noise of
variance ``σ_Δ²C² / m`` with m the round's quorum: the noise of any m survivors adds up to the
mechanism's ``σ_Δ²C²`` (more survivors: more noise, never less). Adaptive clipping's unclipped-count
indicator travels in the same masked vector, with its share of the count noise.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from fedfm import storage
from fedfm.adapters import MAX_SAMPLES, AdapterMeta, Tensors, header_of, l2_norm, load_adapter
from fedfm.config import FederationConfig
from fedfm.errors import FedFMError, QuorumError, SecureAggregationError
from fedfm.server_state import read_server_state
from fedfm.strategies import build_strategy
from fedfm.tasks import LossSums
from fedfm.trust import privacy, secagg, signing
from fedfm.trust.admission import require_quorum

MASKED_FORMAT = "fedfm-masked-update/1"
EVALUATION_FORMAT = "fedfm-masked-evaluation/1"
_MASKED, _REVEALED, _EVALUATED = "masked update", "revealed shares", "masked evaluation"  # what a signature is for
# The server state's record of a round's survivors, their keys and confirmations: what its evaluation needs.
EVALUATION_STATE = "secagg.evaluation"
# A client's evaluation counts as they travel masked: LossSums' fields, in this order (margin_sum, a signed sum,
# is 0 but for preference).
_EVALUATION_FIELDS = ("loss_sum", "count", "correct", "examples", "margin_sum")
_EVALUATION_COUNTS = ("count", "correct", "examples")
_EVALUATION_LAYOUT = [("evaluation", (len(_EVALUATION_FIELDS),))]
WEIGHT = "secagg.weight"  # the extra entries of a contribution, beside the adapter's tensors
LOSS = "secagg.loss"
UNCLIPPED = "secagg.unclipped"
# What a masked update's header says about its client in the clear: when and how long, nothing of its data
# (sample count and loss travel masked, in the sum).
_CLEAR_FIGURES = ("started_at", "finished_at", "seconds", "setup_seconds", "step_seconds", "bytes_down",
                  "world_size", "zero_stage", "bf16")


def local_registry(cfg: FederationConfig) -> signing.Registry:
    """The signing keys a process of this run trusts (:func:`fedfm.trust.signing.registered_keys`). In a
    tenant's Job the operator relays them; never read from locations the federation config chose, which the
    platform controls."""
    if cfg.execution.mode == "kubernetes" and signing.REGISTRY_ENV not in os.environ:
        raise SecureAggregationError(f"no signing keys were relayed to this Job (${signing.REGISTRY_ENV}): the "
                                     "operator sets them from the FederatedClients' spec.signingKey")
    return signing.registered_keys(cfg.client_names, {c: cfg.client_state_location(c) for c in cfg.client_names})


def _identity(cfg: FederationConfig, client: str):
    """The client's private signing key; a local run makes one on first use, a tenant in a cluster registers
    its own (``fedfm keygen``)."""
    return signing.load_identity(client, cfg.client_state_location(client),
                                 create=cfg.execution.mode != "kubernetes")


def context(cfg: FederationConfig, round_index: int) -> bytes:
    """What binds every key, ciphertext and signature to this federation and round."""
    return _context(cfg.name, round_index)


def _context(federation: str, round_index: int) -> bytes:
    return f"{federation}/round-{round_index}".encode()


def _private(cfg: FederationConfig, client: str, round_index: int, name: str, *, new_instance: bool = False) -> str:
    """Where ``client`` keeps ``name`` of its protocol instance for the round: the latest one, or with
    ``new_instance`` (advertising fresh keys) a new one.

    A round started again (a run resumed at the round it was cut off in, a retried advertise Job) runs the
    protocol afresh, with new keys: the first instance keeps its state in ``secagg/round-NNNN/``, the
    K-th in ``secagg/round-NNNN/attempt-K/``. An earlier instance's state is never overwritten, and never
    used again: its shares cannot be revealed a second time, and its keys mask nothing new.
    """
    location = cfg.client_state_location(client)
    if location is None:
        raise FedFMError(f"client {client} takes part in secure aggregation but has nowhere to keep its keys: set "
                         "its state_uri or execution.client_state_uri")
    folder = f"{location}/secagg/round-{round_index:04d}"

    def instance(number: int) -> str:
        return folder if number == 1 else f"{folder}/attempt-{number}"

    started = 0  # instances of this round that advertised keys so far
    while storage.exists(f"{instance(started + 1)}/keys.json"):
        started += 1
    return f"{instance(started + 1 if new_instance else max(started, 1))}/{name}"


def private_update_uri(cfg: FederationConfig, client: str, round_index: int) -> str:
    """Where a client's plain update stays (its own state location); only its masked form is sent."""
    return _private(cfg, client, round_index, "update.safetensors")


def _read_json(uri: str, what: str) -> Any:
    try:
        return json.loads(storage.read_bytes(uri))
    except (ValueError, UnicodeDecodeError) as exc:
        raise SecureAggregationError(f"{what} {uri} is not valid JSON: {exc}") from None


def _write_json(uri: str, value: Any) -> None:
    storage.write_bytes(uri, json.dumps(value, sort_keys=True).encode())


# --- client steps ----------------------------------------------------------------------------------------


def advertise(cfg: FederationConfig, client: str, round_index: int, public_out: str) -> None:
    private, public = secagg.advertise(client, _identity(cfg, client), context(cfg, round_index))
    storage.write_bytes(_private(cfg, client, round_index, "keys.json", new_instance=True), private)
    _write_json(public_out, public)


def share(cfg: FederationConfig, client: str, round_index: int, keys_uri: str, shares_out: str) -> None:
    keys = _read_json(keys_uri, "the advertised keys")
    private = storage.read_bytes(_private(cfg, client, round_index, "keys.json"))
    shared, ciphertexts = secagg.share_keys(client, private, keys["public"], keys["threshold"],
                                            context(cfg, round_index), local_registry(cfg))
    storage.write_bytes(_private(cfg, client, round_index, "shared.json"), shared)
    _write_json(shares_out, ciphertexts)


def mask(cfg: FederationConfig, client: str, round_index: int, update_uri: str, keys_uri: str, masked_out: str,
         noise: dict[str, float] | None = None) -> None:
    """Mask the client's plain update (in its own state location) for the clients that shared (U2);
    under differential privacy, first clip it and add its share of the noise (:func:`train_inputs`)."""
    keys = _read_json(keys_uri, "the keys of the clients that shared")
    update = load_adapter(update_uri, who=f"client {client}")
    contribution = _contribution(cfg, round_index, client, update.tensors, update.meta.samples,
                                 float(update.meta.metrics.get("train_loss", 0.0)), noise or {})
    vector, layout = secagg.encode(contribution, cfg.secure_aggregation.fraction_bits)
    private = storage.read_bytes(_private(cfg, client, round_index, "shared.json"))
    masked = secagg.mask(client, private, keys["public"], vector, context(cfg, round_index), local_registry(cfg))
    header = {"format": MASKED_FORMAT, "client": client, "round": str(round_index),
              "base_model": update.meta.base_model, "layout": json.dumps(layout),
              "fraction_bits": str(cfg.secure_aggregation.fraction_bits),
              "metrics": json.dumps({key: value for key, value in update.meta.metrics.items()
                                     if key in _CLEAR_FIGURES}, sort_keys=True)}
    header["signature"] = signing.sign(_identity(cfg, client), _MASKED, context(cfg, round_index), client,
                                       *_masked_parts(masked, header))
    storage.write_bytes(masked_out, safetensors_save({"masked": torch.from_numpy(masked.view(np.int64))},
                                                     metadata=header))


def _verify_masked(signed_for: bytes, client: str, vector: np.ndarray, header: dict[str, str],
                   registry: signing.Registry) -> None:
    signing.verify(registry, client, header.get("signature"), _MASKED, signed_for, *_masked_parts(vector, header))


def _masked_parts(vector: np.ndarray, header: dict[str, str]) -> tuple[bytes, bytes]:
    """What a masked update's signature covers: the masked vector and every header field but the signature."""
    import hashlib

    fields = json.dumps({key: value for key, value in header.items() if key != "signature"}, sort_keys=True)
    return hashlib.sha256(secagg.vector_to_bytes(vector)).digest(), fields.encode()


def train_inputs(cfg: FederationConfig, keys_uri: str, state_uri: str | None) -> dict[str, float]:
    """What a client needs from the server to clip and noise its own update, computed where the whole
    federation is known (a tenant's Job sees only itself): the clip norm (adaptive clipping's current
    one, from the server state at ``state_uri``), the noise standard deviation per coordinate (σ_Δ·C/√m,
    m the quorum of the clients drawn for the round, as the keys file at ``keys_uri`` records it, so any m
    survivors' noise adds up to σ_Δ·C) and, with adaptive clipping, the count's. Empty without privacy."""
    if not cfg.privacy.enabled:
        return {}
    clip = read_server_state(cfg, state_uri).privacy.clip(cfg)
    share = _noise_share(cfg, _read_json(keys_uri, "the keys of the clients that shared"))
    inputs = {"clip_norm": clip, "noise_stddev": privacy.update_noise_multiplier(cfg) * clip / share}
    if cfg.privacy.adaptive_clipping is not None:
        inputs["count_stddev"] = privacy.count_stddev(cfg) / share
    return inputs


def _contribution(cfg: FederationConfig, round_index: int, client: str, tensors: Tensors, samples: int,
                  train_loss: float, noise: dict[str, float]) -> Tensors:
    """What the client puts into the sum (see the module docstring); without privacy also n and n·loss,
    so the server gets the round's sample count and mean training loss but no client's."""
    if not cfg.privacy.enabled:
        weighted = {name: value * samples for name, value in tensors.items()}
        return {**weighted, WEIGHT: torch.tensor([float(samples)]), LOSS: torch.tensor([samples * train_loss])}
    clip = float(noise["clip_norm"])
    norm = l2_norm(tensors)
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    source = privacy.GaussianNoise(cfg.privacy.noise_seed, client, round_index)
    # in name order: with a noise_seed, each tensor gets the same noise whatever order the update file lists them
    contribution = {name: value * scale + source.normal(float(noise["noise_stddev"]), value.shape)
                    for name, value in sorted(tensors.items())}
    if "count_stddev" in noise:
        count_noise = float(source.normal(float(noise["count_stddev"]), (1,)))
        contribution[UNCLIPPED] = torch.tensor([float(norm <= clip) + count_noise])
    return contribution




def confirm(cfg: FederationConfig, client: str, round_index: int, keys_uri: str, survivors_uri: str,
            confirm_out: str) -> None:
    """The consistency check: sign the survivor set the server announced. The client's state then holds that
    set, and it confirms no other this round (asked again for the same set, it signs the same)."""
    keys = _read_json(keys_uri, "the keys of the clients that shared")
    survivors = _read_json(survivors_uri, "the survivors")
    confirmed = _private(cfg, client, round_index, "confirmed.json")
    before = confirmed if storage.exists(confirmed) else _private(cfg, client, round_index, "shared.json")
    state, signature = secagg.confirm(client, storage.read_bytes(before), keys["public"], survivors,
                                      context(cfg, round_index), _identity(cfg, client), local_registry(cfg))
    if before != confirmed:
        storage.write_bytes(confirmed, state)
    _write_json(confirm_out, {"client": client, "signature": signature})


def reveal(cfg: FederationConfig, client: str, round_index: int, keys_uri: str, inbox_uri: str, survivors_uri: str,
           confirmations_uri: str, reveal_out: str) -> None:
    """The client's shares for the server, once per round and only for the survivor set it confirmed, once the
    threshold of survivors confirmed it too: a second request (another survivor list) is the attack the
    protocol's honest clients refuse. The shares go out signed."""
    done = _private(cfg, client, round_index, "revealed")
    if storage.exists(done):
        raise SecureAggregationError(f"client {client} has already revealed its shares for round {round_index}; "
                                     "it does not answer twice")
    keys = _read_json(keys_uri, "the keys of the clients that shared")
    survivors = _read_json(survivors_uri, "the survivors")
    confirmed = _private(cfg, client, round_index, "confirmed.json")
    if not storage.exists(confirmed):
        raise SecureAggregationError(f"client {client} has confirmed no survivor set for round {round_index}; it "
                                     "reveals nothing")
    shares = secagg.reveal(client, storage.read_bytes(confirmed), keys["public"], _read_json(inbox_uri, "the inbox"),
                           survivors, _read_json(confirmations_uri, "the confirmations"), context(cfg, round_index),
                           local_registry(cfg))
    storage.write_bytes(done, b"")
    signature = signing.sign(_identity(cfg, client), _REVEALED, context(cfg, round_index), client, _canonical(shares))
    _write_json(reveal_out, {"client": client, "shares": shares, "signature": signature})


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True).encode()


def evaluate(cfg: FederationConfig, client: str, round_index: int, adapter_uri: str, keys_uri: str,
             survivors_uri: str, confirmations_uri: str, evaluation_out: str) -> None:
    """The client's evaluation counts of round ``round_index``'s global adapter, masked among the round's
    survivors so that only their sum over all of them can be read, and signed. Once per round (two answers
    under the same masks would give the server their difference), for the survivor set the client confirmed,
    and only for that round's global adapter."""
    from fedfm.adapters import read_meta
    from fedfm.evaluation import evaluate_clients

    done = _private(cfg, client, round_index, "evaluated")
    if storage.exists(done):
        raise SecureAggregationError(f"client {client} has already evaluated round {round_index}; it does not "
                                     "answer twice")
    confirmed = _private(cfg, client, round_index, "confirmed.json")
    if not storage.exists(confirmed):
        raise SecureAggregationError(f"client {client} has confirmed no survivor set for round {round_index}; it "
                                     "evaluates nothing")
    meta = read_meta(adapter_uri)
    if meta.kind != "global" or meta.round != round_index:
        raise SecureAggregationError(f"client {client} is asked to evaluate the {meta.kind} adapter of round "
                                     f"{meta.round}, not round {round_index}'s global adapter")
    keys = _read_json(keys_uri, "the keys of the clients that shared")
    survivors = _read_json(survivors_uri, "the survivors")
    confirmations = _read_json(confirmations_uri, "the confirmations")
    counts = evaluate_clients(cfg, adapter_uri, [client])[client]
    values = torch.tensor([float(getattr(counts, name)) for name in _EVALUATION_FIELDS], dtype=torch.float64)
    vector, _ = secagg.encode({"evaluation": values}, cfg.secure_aggregation.fraction_bits)
    masked = secagg.mask_evaluation(client, storage.read_bytes(confirmed), keys["public"], survivors, confirmations,
                                    vector, context(cfg, round_index), local_registry(cfg))
    storage.write_bytes(done, b"")
    message = {"format": EVALUATION_FORMAT, "client": client, "round": round_index, "adapter": meta.sha256,
               "masked": secagg.vector_to_bytes(masked).hex()}
    message["signature"] = signing.sign(_identity(cfg, client), _EVALUATED, context(cfg, round_index), client,
                                        _canonical(message))
    _write_json(evaluation_out, message)


def _verified_evaluation(signed_for: bytes, client: str, round_index: int, message: Any,
                         registry: signing.Registry) -> tuple[np.ndarray, str]:
    """A masked evaluation's vector and the adapter it scored, once it is ``client``'s, for this round, well
    formed and signed by the client's registered key."""
    if not isinstance(message, dict) or message.get("format") != EVALUATION_FORMAT \
            or message.get("client") != client or message.get("round") != round_index:
        raise SecureAggregationError(f"the evaluation sent for client {client} is not its masked evaluation of "
                                     f"round {round_index}")
    signing.verify(registry, client, message.get("signature"), _EVALUATED, signed_for,
                   _canonical({key: value for key, value in message.items() if key != "signature"}))
    try:
        vector = secagg.vector_from_bytes(bytes.fromhex(message["masked"]))
    except (TypeError, ValueError, KeyError):
        raise SecureAggregationError(f"client {client}'s masked evaluation is not a hex vector") from None
    if vector.size != len(_EVALUATION_FIELDS):
        raise SecureAggregationError(f"client {client}'s masked evaluation holds {vector.size} values, not "
                                     f"{len(_EVALUATION_FIELDS)}")
    return vector, str(message.get("adapter"))


def sum_evaluations(cfg: FederationConfig, round_index: int, adapter_sha256: str, survivors: list[str],
                    answers: dict[str, str], registry: signing.Registry,
                    missing: dict[str, str]) -> tuple[LossSums | None, str]:
    """The round's evaluation from its survivors' masked answers (client → URI): their summed counts, once
    every survivor's answer arrived and verified, and a note; None and why otherwise, the survivors that gave
    no answer (or one that is refused: not its own, another round's or adapter's) in ``missing``. A sum that
    no survivors' honest counts can make (more correct than scored, more than the bound on a tenant's
    examples each) is refused too: a tenant's counts cannot be checked alone under the masks, only their
    sum."""
    signed_for = context(cfg, round_index)
    total = None
    for client in survivors:
        if client not in answers:
            missing.setdefault(client, "no evaluation answer")
            continue
        try:
            vector, adapter = _verified_evaluation(signed_for, client, round_index,
                                                   _read_json(answers[client], f"client {client}'s evaluation"),
                                                   registry)
            if adapter != adapter_sha256:
                raise SecureAggregationError(f"client {client} evaluated adapter {adapter[:12]}, not the round's "
                                             f"({adapter_sha256[:12]})")
        except SecureAggregationError as exc:
            missing[client] = f"rejected: {exc}"
            continue
        total = secagg.add_masked(total, vector)
    unanswered = sorted(set(survivors) & set(missing))
    if unanswered or total is None:
        return None, (f"not revealed: {', '.join(unanswered) or 'no survivor'} gave no evaluation the server can "
                      "add, and the survivors' counts stay masked without every one of them")
    values = secagg.decode(total, _EVALUATION_LAYOUT, cfg.secure_aggregation.fraction_bits)["evaluation"].tolist()
    figures = dict(zip(_EVALUATION_FIELDS, values))
    counts = {name: round(figures[name]) for name in _EVALUATION_COUNTS}
    bound = len(survivors) * (cfg.policy.max_client_samples or MAX_SAMPLES)
    honest = (all(abs(figures[name] - counts[name]) < 1e-3 and 0 <= counts[name] <= bound for name in counts)
              and math.isfinite(figures["loss_sum"]) and figures["loss_sum"] > -1e-3
              and (counts["correct"] <= counts["count"] == counts["examples"] if cfg.task != "causal-lm"
                   else counts["correct"] == 0)
              and (cfg.task == "preference" or abs(figures["margin_sum"]) < 1e-3))
    if not honest:
        shown = ", ".join(f"{name} {value:.6g}" for name, value in figures.items())
        return None, (f"refused: the survivors' summed counts ({shown}) are not what honest counts add up to: a "
                      "survivor forged its evaluation")
    summed = LossSums(max(figures["loss_sum"], 0.0), counts["count"], counts["correct"], counts["examples"],
                      figures["margin_sum"])
    return summed, f"summed over the round's {len(survivors)} survivors, each tenant's counts masked"


def evaluation_record(keys_uri: str, survivors_uri: str, confirmations_uri: str, round_index: int) -> dict[str, Any]:
    """What the round's evaluation needs (the survivors, the keys they shared, their confirmations), for the
    server state: public messages only."""
    return {"round": round_index, "keys": _read_json(keys_uri, "the keys of the clients that shared"),
            "survivors": _read_json(survivors_uri, "the survivors"),
            "confirmations": _read_json(confirmations_uri, "the confirmations")}


CLIENT_PHASES = ("advertise", "share", "train", "confirm", "reveal", "evaluate")


def client_step(cfg: FederationConfig, client: str, round_index: int, phase: str, inputs: dict[str, str],
                output: str) -> None:
    """One of a client's steps, by name, with its inputs as URIs (what a pipeline step or a tenant's Job
    runs): ``advertise`` (no inputs), ``share`` (``keys``), ``train`` (``global``, ``keys``, and
    under privacy :func:`train_inputs`'s numbers: fine-tune, keep the plain update, send it masked) and
    ``confirm`` (``keys``, ``survivors``), ``reveal`` (``keys``, ``inbox``, ``survivors``, ``confirmations``) and,
    after the round, ``evaluate`` (``global``, ``keys``, ``survivors``, ``confirmations``)."""
    if phase == "advertise":
        advertise(cfg, client, round_index, output)
    elif phase == "share":
        share(cfg, client, round_index, inputs["keys"], output)
    elif phase == "train":
        from fedfm.training import train_client

        plain = private_update_uri(cfg, client, round_index)
        if train_client(cfg, client, round_index, inputs["global"], plain) is None:
            return  # a node other than the first of a multi-node fine-tune: the first masks and sends
        noise = {name: float(inputs[name]) for name in ("clip_norm", "noise_stddev", "count_stddev") if name in inputs}
        mask(cfg, client, round_index, plain, inputs["keys"], output, noise)
    elif phase == "confirm":
        confirm(cfg, client, round_index, inputs["keys"], inputs["survivors"], output)
    elif phase == "reveal":
        reveal(cfg, client, round_index, inputs["keys"], inputs["inbox"], inputs["survivors"], inputs["confirmations"],
               output)
    elif phase == "evaluate":
        evaluate(cfg, client, round_index, inputs["global"], inputs["keys"], inputs["survivors"],
                 inputs["confirmations"], output)
    else:
        raise SecureAggregationError(f"unknown secure aggregation step {phase!r} (one of {', '.join(CLIENT_PHASES)})")


def check_secure_output(federation: str, step: str, uri: str, client: str, round_index: int,
                        registry: signing.Registry) -> None:
    """What the operator checks of a client's protocol message in ``federation``: signed by the client under
    ``registry`` (its FederatedClient's key) for this federation and round, and for a masked update, a header
    that says it is this client's for this round."""
    signed_for = _context(federation, round_index)
    if step == "train":
        vector, header = _read_masked(uri, client)
        if header.get("client") != client or header.get("round") != str(round_index):
            raise SecureAggregationError(f"the masked update at {uri} is {header.get('client')!r}'s for round "
                                         f"{header.get('round')}, not client {client}'s for round {round_index}")
        _verify_masked(signed_for, client, vector, header, registry)
        return
    message = _read_json(uri, f"client {client}'s {step} message")
    if not isinstance(message, dict) or not message:
        raise SecureAggregationError(f"client {client}'s {step} message at {uri} is empty")
    if step == "evaluate":
        _verified_evaluation(signed_for, client, round_index, message, registry)
    if step == "advertise":  # the other messages' signatures cover what only the server steps hold (U3, U2)
        secagg.check_advertisement(client, message, signed_for, registry)


# --- server steps ----------------------------------------------------------------------------------------


def relay_keys(cfg: FederationConfig, round_index: int, published: dict[str, str], keys_out: str,
               drawn: list[str], registry: signing.Registry, rejected: dict[str, str] | None = None) -> list[str]:
    """Collect the advertised keys (U1) into one file every client reads; returns U1. The threshold is of the
    clients ``drawn`` for the round (the select step's, without the quarantined ones). An advertisement not
    signed by its client's key in ``registry`` goes into ``rejected`` (client → why), and the client is not in
    U1 (without ``rejected`` it raises)."""
    public = {}
    for client, uri in sorted(published.items()):
        try:
            message = _read_json(uri, f"client {client}'s public keys")
            secagg.check_advertisement(client, message, context(cfg, round_index), registry)
        except SecureAggregationError as exc:
            if rejected is None:
                raise
            rejected[client] = f"rejected: {exc}"
            continue
        public[client] = message
    # How many clients the round drew (the quarantined ones are not): what the threshold, and under privacy each
    # client's share of the noise, are of; recorded here once, read by the steps after. Every drawn client
    # survives or is missing, so the quorum of survivors that finish requires is the m of that share.
    threshold = cfg.secagg_threshold(len(drawn))
    if len(public) < threshold:
        raise QuorumError(f"round {round_index}: {len(public)} clients advertised keys, below the secure "
                          f"aggregation threshold of {threshold}; no client masks anything")
    _write_json(keys_out, {"public": public, "threshold": threshold, "drawn": len(drawn)})
    return sorted(public)


def relay_shares(keys_uri: str, sent: dict[str, str], keys_out: str, inboxes: dict[str, str]) -> list[str]:
    """Pass each client the ciphertexts addressed to it (``inboxes[client]``), and write the keys of the
    clients that shared (U2) to ``keys_out``; returns U2."""
    keys = _read_json(keys_uri, "the advertised keys")
    shared = {client: _read_json(uri, f"client {client}'s shares") for client, uri in sorted(sent.items())}
    for client in shared:
        _write_json(inboxes[client], {sender: ciphertexts[client] for sender, ciphertexts in shared.items()
                                      if sender != client and client in ciphertexts})
    public = {client: keys["public"][client] for client in shared}
    _write_json(keys_out, {"public": public, "threshold": keys["threshold"], "drawn": keys["drawn"]})
    return sorted(public)


def sum_masked(cfg: FederationConfig, round_index: int, global_uri: str, masked: dict[str, str], keys_uri: str,
               survivors_out: str, sum_out: str, registry: signing.Registry,
               rejected: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """Add the masked updates that arrived (mod 2^64, one at a time) and announce who survived (U3).

    Each is checked for what can be checked on a masked value: whose (its client's signature under
    ``registry``), which round, which base model, and its layout (the global adapter's tensors, at the
    fraction bits configured). One that fails goes into ``rejected`` (client → why) and its client counts as
    dropped, whose masks the survivors' shares remove as for any dropout: one tenant's malformed or forged
    message does not end the round (without ``rejected`` it raises SecureAggregationError). Returns each
    survivor's reported figures (its training metrics and the bytes it sent)."""
    keys = _read_json(keys_uri, "the keys of the clients that shared")
    current = load_adapter(global_uri, who="the federation")
    expected = _layout(cfg, round_index, current.tensors)
    total, figures = None, {}
    for client, uri in sorted(masked.items()):
        try:
            vector, header = _checked_masked(cfg, round_index, current, expected, keys, client, uri, registry)
        except SecureAggregationError as exc:
            if rejected is None:
                raise
            rejected[client] = f"rejected: {exc}"
            continue
        total = secagg.add_masked(total, vector)
        figures[client] = {**json.loads(header.get("metrics", "{}")), "bytes_up": storage.size(uri)}
    survivors = sorted(figures)
    threshold = keys["threshold"]
    if len(survivors) < threshold:
        raise QuorumError(f"round {round_index}: {len(survivors)} masked updates arrived, below the secure "
                          f"aggregation threshold of {threshold}; no aggregate is produced")
    _write_json(survivors_out, survivors)
    storage.write_bytes(sum_out, secagg.vector_to_bytes(total))
    return figures


def relay_confirmations(cfg: FederationConfig, round_index: int, keys_uri: str, survivors_uri: str,
                        confirmed: dict[str, str], confirmations_out: str, registry: signing.Registry,
                        rejected: dict[str, str]) -> list[str]:
    """Collect the survivors' signatures over the survivor set into the file each of them checks before it
    reveals; returns the clients that confirmed. One that is not its client's signature over that set goes
    into ``rejected``; fewer than the threshold confirming ends the round (no client would reveal)."""
    keys = _read_json(keys_uri, "the keys of the clients that shared")
    survivors = _read_json(survivors_uri, "the survivors")
    signatures = {}
    for client, uri in sorted(confirmed.items()):
        try:
            message = _read_json(uri, f"client {client}'s confirmation")
            if not isinstance(message, dict) or message.get("client") != client or client not in survivors:
                raise SecureAggregationError(f"the confirmation at {uri} is not survivor {client}'s")
            secagg.verify_confirmation(client, message.get("signature"), survivors, context(cfg, round_index),
                                       registry)
        except SecureAggregationError as exc:
            rejected[client] = f"rejected: {exc}"
            continue
        signatures[client] = message["signature"]
    if len(signatures) < keys["threshold"]:
        raise QuorumError(f"round {round_index}: {len(signatures)} survivors confirmed the survivor set, below the "
                          f"secure aggregation threshold of {keys['threshold']}; no client reveals anything")
    _write_json(confirmations_out, signatures)
    return sorted(signatures)


def _checked_masked(cfg: FederationConfig, round_index: int, current, expected, keys: dict, client: str,
                    uri: str, registry: signing.Registry) -> tuple[np.ndarray, dict[str, str]]:
    """``client``'s masked update at ``uri`` and its header, once what can be checked of it holds."""
    if client not in keys["public"]:
        raise SecureAggregationError(f"client {client} sent a masked update but did not share keys (U2)")
    vector, header = _read_masked(uri, client)
    if header.get("round") != str(round_index) or header.get("client") != client:
        raise SecureAggregationError(f"client {client}'s masked update {uri} is for round {header.get('round')} "
                                     f"of {header.get('client')!r}, not round {round_index} of {client}")
    _verify_masked(context(cfg, round_index), client, vector, header, registry)
    if header.get("base_model") != current.meta.base_model:
        raise SecureAggregationError(f"client {client} trained on another base model than the federation's")
    try:
        layout = json.loads(header.get("layout", "null"))
    except (ValueError, RecursionError):
        layout = None
    if layout != [[name, list(shape)] for name, shape in expected] \
            or header.get("fraction_bits") != str(cfg.secure_aggregation.fraction_bits):
        raise SecureAggregationError(f"client {client}'s masked update does not have the tensors, shapes and "
                                     "precision this round expects")
    try:
        metrics = json.loads(header.get("metrics", "{}"))
    except (ValueError, RecursionError):
        metrics = None
    if not isinstance(metrics, dict):
        raise SecureAggregationError(f"client {client}'s masked update has metrics that are not a JSON object")
    return vector, header


def finish(cfg: FederationConfig, round_index: int, global_uri: str, keys_uri: str, survivors_uri: str,
           sum_uri: str, revealed: dict[str, str], figures: dict[str, dict[str, Any]], global_out: str,
           registry: signing.Registry, missing: dict[str, str] | None = None, *, state_in: str | None = None,
           state_out: str | None = None, confirmations_uri: str | None = None) -> AdapterMeta:
    """Unmask the sum with the revealed shares (each signed by its client under ``registry``; one that is
    not is left out, its client named in ``missing``), make it the round's mean update, and write the next
    global adapter as :func:`fedfm.federation.aggregate_round` does (same record, server state chained).
    With ``confirmations_uri``, the server state also records what the round's evaluation needs."""
    from fedfm.federation import _mean_update, refuse_overwrite, write_round

    started = time.time()
    missing = dict(missing or {})
    refuse_overwrite(global_out, state_out)
    keys = _read_json(keys_uri, "the keys of the clients that shared")
    survivors = _read_json(survivors_uri, "the survivors")
    require_quorum(cfg, round_index, len(survivors), missing)
    shares = {}
    for client, uri in sorted(revealed.items()):
        try:
            message = _read_json(uri, f"client {client}'s revealed shares")
            if not isinstance(message, dict) or message.get("client") != client:
                raise SecureAggregationError(f"the revealed shares at {uri} are not client {client}'s")
            signing.verify(registry, client, message.get("signature"), _REVEALED, context(cfg, round_index),
                           _canonical(message.get("shares")))
        except SecureAggregationError as exc:
            missing[client] = f"rejected: {exc}"
            continue
        shares[client] = message["shares"]
    total = secagg.unmask(secagg.vector_from_bytes(storage.read_bytes(sum_uri)), keys["public"], survivors, shares,
                          keys["threshold"], context(cfg, round_index), registry)
    current = load_adapter(global_uri, who="the federation")
    summed = secagg.decode(total, _layout(cfg, round_index, current.tensors), cfg.secure_aggregation.fraction_bits)

    strategy = build_strategy(cfg.strategy)
    before = read_server_state(cfg, state_in)
    privacy_state, quarantine = before.privacy, before.quarantine
    metrics: dict[str, Any] = {"clients": figures, "missing": missing, "strategy": strategy.name,
                               "secure_aggregation": {"survivors": survivors, "threshold": keys["threshold"],
                                                      "dropped": sorted(set(keys["public"]) - set(survivors))}}
    if cfg.privacy.enabled:  # the server learns no sample count: 0 stands for unknown
        mean, metrics["privacy"], privacy_state = _private_mean(cfg, round_index, summed, privacy_state,
                                                                len(survivors), _noise_share(cfg, keys))
        samples = 0
    else:
        weight, loss = float(summed.pop(WEIGHT)[0]), float(summed.pop(LOSS)[0])
        # Each survivor put in its samples n ≥ 1 (at most MAX_SAMPLES) and n·loss ≥ 0: a sum outside that
        # is a masked weight of 0 or below, or a forged one, that would divide by zero or flip the mean.
        if not (len(survivors) <= weight <= len(survivors) * MAX_SAMPLES and math.isfinite(loss) and loss >= 0):
            raise SecureAggregationError(f"round {round_index}: the unmasked sum of the survivors' sample counts is "
                                         f"{weight:g} (loss sum {loss:g}) for {len(survivors)} clients: a client put "
                                         "in an impossible weight; no aggregate is produced")
        mean = {name: value / weight for name, value in summed.items()}
        samples = int(round(weight))
        metrics["train_loss"] = loss / weight
    for name, value in mean.items():
        if not torch.isfinite(value).all():
            raise SecureAggregationError(f"round {round_index}: the unmasked mean update's tensor {name} is not "
                                         "finite; no aggregate is produced")
    aggregate = strategy.aggregate(current.tensors, [_mean_update(current, mean, round_index)], state=before.rule)
    aggregate.clients, aggregate.samples = survivors, samples
    failing = quarantine.count_failures(survivors, missing, round_index, cfg.policy.quarantine_after_failures)
    if failing:  # clients quarantined for failing round after round
        metrics["quarantined"] = failing
    extra_state = {**quarantine.as_state(), **(privacy_state.as_state() if cfg.privacy.enabled else {})}
    if confirmations_uri is not None:
        extra_state[EVALUATION_STATE] = evaluation_record(keys_uri, survivors_uri, confirmations_uri, round_index)
    return write_round(cfg, round_index, current, strategy.name, aggregate, metrics, started, global_out, state_out,
                       extra_state)


def _noise_share(cfg: FederationConfig, keys: dict) -> float:
    """√m, m the quorum of the clients drawn for the round (``drawn`` in the relayed keys): each client adds
    1/√m of the mechanism's noise, so that any m survivors' add up to all of it."""
    return math.sqrt(max(cfg.quorum(keys["drawn"]), 1))


# How many standard deviations of the summed noise the sum's norm may exceed |U|·C by: a Gaussian vector's norm
# passes σ(√d + t) with probability at most exp(−t²/2), e^-50 here, so an honest round is never refused.
_NOISE_TAIL = 10.0


def _private_mean(cfg: FederationConfig, round_index: int, summed: Tensors, state: privacy.PrivacyState,
                  survivors: int, share: float) -> tuple[Tensors, dict[str, Any], privacy.PrivacyState]:
    """DP-FedAvg's mean from a sum the clients already noised (each with ``1/share`` of the noise): the budget,
    the fixed denominator, and adaptive clipping's next norm from the noised count."""
    figures, after = privacy.release(cfg, round_index, state)
    figures["noise"] = "client"
    _check_private_sum(cfg, round_index, summed, survivors, figures["clip_norm"], share)
    unclipped = float(summed.pop(UNCLIPPED)[0]) if UNCLIPPED in summed else None
    mean = {name: value / privacy.expected_clients(cfg) for name, value in summed.items()}
    if unclipped is not None:
        after.clip_norm = privacy.clip_step(cfg, figures["clip_norm"], unclipped)
        figures.update(unclipped=unclipped, next_clip_norm=after.clip_norm)
    return mean, figures, after


def _check_private_sum(cfg: FederationConfig, round_index: int, summed: Tensors, survivors: int,
                       clip: float, share: float) -> None:
    """Each of the |U| survivors put in its update clipped to C plus Gaussian noise (``train_inputs``), so the
    sum's norm is at most |U|·C plus the summed noise's, and the unclipped count is between 0 and |U| plus
    its noise. A sum beyond that has an update in it that was never clipped (a tenant's, which the masks
    hide): it would move the model as far as that tenant likes, and no aggregate is produced."""
    spread = math.sqrt(survivors) / share  # the sum of |U| noises of σ/√m each: σ·√(|U|/m)
    update = {name: value for name, value in summed.items() if name != UNCLIPPED}
    dimension = sum(value.numel() for value in update.values())
    noise = privacy.update_noise_multiplier(cfg) * clip * spread
    bound = survivors * clip + noise * (math.sqrt(dimension) + _NOISE_TAIL)
    norm = l2_norm(update)
    if not norm <= bound:  # NaN fails too
        raise SecureAggregationError(f"round {round_index}: the unmasked sum of the {survivors} survivors' updates has "
                                     f"norm {norm:.4g}, more than {survivors} updates clipped to {clip:g} and their "
                                     f"noise can make ({bound:.4g}): a client put in an update it did not clip; no "
                                     "aggregate is produced")
    if UNCLIPPED in summed:
        count, slack = float(summed[UNCLIPPED][0]), privacy.count_stddev(cfg) * spread * _NOISE_TAIL
        if not -slack <= count <= survivors + slack:
            raise SecureAggregationError(f"round {round_index}: the unmasked count of unclipped updates is {count:.4g} "
                                         f"for {survivors} survivors (noise allows {-slack:.3g} to "
                                         f"{survivors + slack:.3g}): a client put in a forged count; no aggregate is "
                                         "produced")


def _layout(cfg: FederationConfig, round_index: int, global_tensors: Tensors) -> list[tuple[str, tuple[int, ...]]]:
    """The names and shapes of a contribution, in :func:`secagg.encode`'s (sorted) order."""
    from fedfm.strategies import expected_update_shapes

    shapes = expected_update_shapes(cfg, cfg.training_clients[0], round_index, global_tensors)
    shapes = dict(shapes) if shapes is not None else {name: tuple(value.shape) for name, value in
                                                      global_tensors.items()}
    if cfg.privacy.enabled:
        if cfg.privacy.adaptive_clipping is not None:
            shapes[UNCLIPPED] = (1,)
    else:  # under privacy n and n·loss would be released without noise: not sent
        shapes[WEIGHT] = shapes[LOSS] = (1,)
    return [(name, tuple(shapes[name])) for name in sorted(shapes)]


def _read_masked(uri: str, client: str) -> tuple[np.ndarray, dict[str, str]]:
    data = storage.read_bytes(uri)
    try:
        tensors = safetensors_load(data)
        header = header_of(data) or {}
    except Exception as exc:  # safetensors and json raise several types for damaged bytes
        raise SecureAggregationError(f"client {client}'s masked update {uri} is damaged: {exc}") from None
    if header.get("format") != MASKED_FORMAT or set(tensors) != {"masked"} or tensors["masked"].dtype != torch.int64:
        raise SecureAggregationError(f"{uri} is not a FedFM masked update (client {client})")
    return tensors["masked"].numpy().view(np.uint64), header
