"""What a tenant decides for itself in its FederatedClient, and the operator enforces on each of its rounds:
where it keeps what it never sends (``spec.state``) and which models may run next to its data and Secrets
(``spec.modelPolicy``).

The federation config is the platform's, and a tenant trusts neither the platform nor the other tenants with
its keys, its plain update or its data. So the state location a ClientRound's config may carry is replaced
by the tenant's own before the Job sees it, and a round whose model the tenant has not allowed (or whose
remote code it has not allowed) is refused before any Job exists.
"""

from __future__ import annotations

import copy
import fnmatch
from typing import Any

from fedfm import storage
from fedfm.config import FederationConfig
from fedfm.errors import FedFMError
from fedfm.operators.api import SECURE
from fedfm.strategies import client_keeps

# Where a tenant's state PersistentVolumeClaim is mounted (read-write) in its Jobs.
STATE_MOUNT = "/state"


def state_location(federated_client: dict) -> str | None:
    """Where the tenant keeps its state, as its Jobs see it: a path on its state PVC, or its own URI."""
    state = federated_client["spec"].get("state") or {}
    if "pvc" in state:
        return f"{STATE_MOUNT}/{state['pvc']['path'].strip('/')}".rstrip("/")
    return state.get("uri") or None


def job_config(config: dict, federated_client: dict) -> dict:
    """The config the tenant's Job runs: the round's, with the tenant's own state location for every client
    in it and none from the platform (``execution.client_state_uri`` dropped)."""
    own = copy.deepcopy(config)
    location = state_location(federated_client)
    for client in own.get("clients") or []:
        if isinstance(client, dict):
            client["state_uri"] = location
    if isinstance(own.get("execution"), dict):
        own["execution"].pop("client_state_uri", None)
    return own


def _allows(entry: str, name: str, revision: str | None) -> bool:
    """``entry`` is ``PATTERN`` (any revision of a model whose id matches the glob) or ``PATTERN@REVISION``
    (that revision only, as the config names it)."""
    pattern, _, pinned = entry.partition("@")
    return fnmatch.fnmatchcase(name, pattern) and (not pinned or revision == pinned)


def storage_grant(federated_client: dict) -> str | None:
    """The Secret (in the tenant's namespace) holding the tenant's own credential to the federation's storage."""
    return ((federated_client["spec"].get("federationStorage") or {}).get("secretRef") or {}).get("name")


def refusal(client_round: dict, federated_client: dict, storage_root: str | None = None) -> tuple[str, str] | None:
    """Why the tenant's own settings refuse this round (reason, message), or None. ``storage_root``: where the
    federation's objects are."""
    config = client_round["spec"].get("config") or {}
    client = client_round["spec"]["client"]
    where = f"FederatedClient {federated_client['metadata'].get('namespace', '')}/{client}"
    model = config.get("model") or {}
    name = str(model.get("name_or_path", FederationConfig().model.name_or_path))
    revision = model.get("revision")
    policy = federated_client["spec"].get("modelPolicy") or {}
    if model.get("trust_remote_code") and not policy.get("allowRemoteCode", False):
        return "RemoteCodeNotAllowed", (f"model {name!r} asks for trust_remote_code: its code would run next to "
                                        f"client {client}'s data and Secrets; {where} does not allow remote code "
                                        "(spec.modelPolicy.allowRemoteCode)")
    allowed = policy.get("allowedModels")
    if allowed is not None and not any(_allows(entry, name, revision) for entry in allowed):
        shown = f"{name}@{revision}" if revision else f"{name} (no revision pinned)"
        return "ModelNotAllowed", (f"model {shown} is not in {where}'s spec.modelPolicy.allowedModels "
                                   f"({', '.join(allowed) or 'empty'})")
    if storage_root and storage.is_remote(storage_root) and not storage_grant(federated_client):
        return "NoStorageGrant", (f"the federation's storage {storage_root} is reached with a credential per tenant, "
                                  f"and {where} names none (spec.federationStorage.secretRef): the platform admin "
                                  f"makes one allowed `fedfm storage-policy --client {client}` and puts it in a "
                                  "Secret in this namespace")
    if client_round["spec"].get("purpose") == SECURE and not federated_client["spec"].get("signingKey"):
        return "NoSigningKey", (f"client {client} takes part in secure aggregation but {where} registers no signing "
                                "key (spec.signingKey): create one with `fedfm keygen` and register its public half")
    if state_location(federated_client) is None:
        try:
            kept = client_keeps(FederationConfig.parse(config, source="the round's config"), client)
        except FedFMError:
            kept = []  # the Job says what is wrong with the config itself
        if kept:
            return "NoStateLocation", (f"client {client} keeps {' and '.join(kept)} in storage only it can read, and "
                                       f"{where} has no spec.state saying where")
    return None


def state_volume(federated_client: dict) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The tenant's state PVC as (volume, mount), read-write, or None."""
    state = federated_client["spec"].get("state") or {}
    if "pvc" not in state:
        return None
    return ({"name": "state", "persistentVolumeClaim": {"claimName": state["pvc"]["claimName"]}},
            {"name": "state", "mountPath": STATE_MOUNT})
