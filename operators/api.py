"""The FedFM API group: kinds, phases, labels and object names shared by the operator and the pipeline."""

from __future__ import annotations

import hashlib
import re

from fedfm.executors import FAILED, SUCCEEDED, TIMED_OUT

GROUP = "fedfm.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

FEDERATIONS = "federations"
FEDERATED_CLIENTS = "federatedclients"
CLIENT_ROUNDS = "clientrounds"

# Labels the operator puts on what it creates (and selects by).
LABEL_FEDERATION = f"{GROUP}/federation"
LABEL_CLIENT = f"{GROUP}/client"
LABEL_ROUND = f"{GROUP}/round"
LABEL_RUN = f"{GROUP}/run"
LABEL_CLIENT_ROUND = f"{GROUP}/client-round"
LABEL_PURPOSE = f"{GROUP}/purpose"

# ClientRound
TRAIN, EVALUATE = "Train", "Evaluate"
# One of a client's secure-aggregation steps (spec.secureStep: advertise, share, train, reveal)
SECURE = "SecureAggregation"
# The phases a client's work ends in are the core's (imported above): the aggregate step reads them.
PENDING, RUNNING = "Pending", "Running"
FINAL_PHASES = (SUCCEEDED, FAILED, TIMED_OUT)
# A ClientRound that failed because its update was invalid: the reason that quarantines the client.
INVALID_UPDATE = "InvalidUpdate"

# FederatedClient
READY, TRAINING, QUARANTINED, EVICTED = "Ready", "Training", "Quarantined", "Evicted"

_MAX_NAME = 63  # Job names become Pod label values, which stop at 63 characters


def client_round_name(federation: str, run_id: str, round_index: int, purpose: str, client: str,
                      step: str = "") -> str:
    """A stable, unique, DNS-1123 name for one client's work in one round of one run.

    The same inputs always give the same name, so a retried pipeline step finds its ClientRound
    instead of creating a second one. Long names keep their start and end a hash of the whole.
    """
    run = hashlib.sha256(run_id.encode()).hexdigest()[:8]
    kind = "eval" if purpose == EVALUATE else f"sa-{step}" if purpose == SECURE else "train"
    name = f"{federation}-{run}-r{round_index}-{kind}-{client}"
    name = re.sub(r"[^a-z0-9-]", "-", name.lower())
    if len(name) <= _MAX_NAME:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:10]
    return f"{name[: _MAX_NAME - len(digest) - 1].rstrip('-')}-{digest}"


def condition(type_: str, status: bool, reason: str, message: str, now: str) -> dict:
    return {"type": type_, "status": "True" if status else "False", "reason": reason, "message": message,
            "lastTransitionTime": now}


def set_condition(conditions: list[dict] | None, new: dict) -> list[dict]:
    """``conditions`` with ``new`` in place of the one of its type; the transition time moves only on change."""
    result = []
    replaced = False
    for existing in conditions or []:
        if existing.get("type") == new["type"]:
            replaced = True
            if (existing.get("status"), existing.get("reason"), existing.get("message")) == (
                    new["status"], new["reason"], new["message"]):
                result.append(existing)
                continue
            result.append(new)
        else:
            result.append(existing)
    if not replaced:
        result.append(new)
    return result
