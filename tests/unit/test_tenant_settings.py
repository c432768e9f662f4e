"""What a tenant decides for itself in its FederatedClient (issue 17): where it keeps its secrets (finding 2:
the federation config once chose each client's state_uri, so the platform could point a tenant's keys and
plain update at storage the platform reads), which models may run next to its data (finding 10: whoever
edits the Federation chose the model and trust_remote_code for every tenant's Jobs), the signing keys its
peers' messages are verified with (finding 3) and its own key to the federation's storage (finding 1: every
tenant's Jobs once had the platform's).

Each attack is a ClientRound as a hostile platform would write it, put through the operator's handler against
an in-memory apiserver (tests/cluster runs the handlers for real)."""

from __future__ import annotations

import copy
import json
import re

import pytest

from fedfm.config import FederationConfig
from fedfm.errors import ConfigError
from fedfm.operators import handlers, kube
from fedfm.operators.api import FAILED, PENDING, SECURE, TRAIN
from fedfm.operators.jobs import job_manifest
from fedfm.trust import grants, signing

MODEL = {"name_or_path": "sentence-transformers/all-MiniLM-L6-v2", "revision": "c9745ed1"}
STOLEN = "s3://platform-bucket/collected/a"


def _config(**sections) -> dict:
    """A round's config as the cluster executor writes it (this client only), plus ``sections``."""
    config = {"name": "fed", "model": dict(MODEL), "clients": [{"name": "a"}], "data": {"labels": ["x", "y"]}}
    config.update(sections)
    return config


def _round(config: dict) -> dict:
    return {"metadata": {"name": "fed-r1-train-a", "namespace": "tenant-a", "uid": "uid-1", "resourceVersion": "1"},
            "spec": {"federation": {"name": "fed", "namespace": "platform"}, "client": "a", "round": 1,
                     "purpose": TRAIN, "globalAdapterURI": "s3://fed/g.safetensors",
                     "outputURI": "s3://fed/u.safetensors", "config": config}}


def _client(**spec) -> dict:
    base = {"federationRef": {"name": "fed", "namespace": "platform"}, "image": "registry/fedfm:1",
            "data": {"uri": "s3://tenant-a/train.csv", "secretRef": {"name": "tenant-a-data"}}}
    return {"metadata": {"name": "a", "namespace": "tenant-a"}, "spec": {**base, **spec},
            "status": {"phase": "Ready"}}


def _job_config(job: dict) -> dict:
    env = {item["name"]: item["value"] for item in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    return json.loads(env["FEDFM_CONFIG"])


class Apiserver:
    """The objects ``handlers.start_client_round`` reads, and the Jobs it creates."""

    def __init__(self, monkeypatch, client_round: dict, federated_client: dict, storage_uri: str | None = None):
        self.round, self.jobs, self.events = client_round, [], []
        federation = {"metadata": {"name": "fed", "namespace": "platform"},
                      "spec": {"config": {key: client_round["spec"]["config"].get(key)
                                          for key in handlers._MUST_MATCH}}}
        if storage_uri:
            federation["spec"]["config"].update(name="fed", execution={"storage_uri": storage_uri})
        monkeypatch.setattr(kube, "get_federated_client", lambda namespace, name: copy.deepcopy(federated_client))
        monkeypatch.setattr(kube, "get_federation", lambda namespace, name: copy.deepcopy(federation))
        monkeypatch.setattr(kube, "get_client_round", lambda namespace, name: copy.deepcopy(self.round))
        monkeypatch.setattr(kube, "patch_status", self.patch_status)
        monkeypatch.setattr(kube, "batch", lambda: self)
        monkeypatch.setattr(handlers, "_event", lambda obj, normal, reason, message: self.events.append(reason))
        monkeypatch.setattr(handlers.metrics, "client_round_finished", lambda *args: None)

    def patch_status(self, plural, namespace, name, status, resource_version=None):
        self.round.setdefault("status", {}).update({key: value for key, value in status.items() if value is not None})

    def create_namespaced_job(self, namespace, body):
        self.jobs.append(body)

    def start(self) -> dict:
        class Patch:
            status: dict = {}

        body = copy.deepcopy(self.round)
        handlers.start_client_round(body=body, spec=body["spec"], status=body.get("status") or {},
                                    name=body["metadata"]["name"], namespace="tenant-a", patch=Patch())
        return self.round.get("status") or {}


# --- finding 2: the tenant says where it keeps its secrets -----------------------------------------------------


def test_the_platform_cannot_point_a_tenants_secrets_at_storage_it_reads(monkeypatch):
    """The platform writes its own bucket into the round's config as the client's state_uri and as
    execution.client_state_uri; the Job keeps the tenant's keys and plain update where the tenant's
    FederatedClient says, and the platform's locations are gone."""
    hostile = _config(clients=[{"name": "a", "state_uri": STOLEN}], execution={"client_state_uri": STOLEN},
                      secure_aggregation={"enabled": True})
    tenant = _client(state={"uri": "s3://tenant-a-private/fedfm", "secretRef": {"name": "tenant-a-state"}})
    apiserver = Apiserver(monkeypatch, _round(hostile), tenant)
    assert apiserver.start()["phase"] == PENDING
    job = apiserver.jobs[0]
    config = _job_config(job)
    assert config["clients"] == [{"name": "a", "state_uri": "s3://tenant-a-private/fedfm"}]
    assert "client_state_uri" not in config["execution"] and STOLEN not in json.dumps(job)
    # what the Job runs resolves to the tenant's location, and to nothing of the platform's
    assert FederationConfig.parse(config).client_state_location("a") == "s3://tenant-a-private/fedfm"
    # the state's credentials come from the tenant's own Secret, after (so over) the data's
    assert job["spec"]["template"]["spec"]["containers"][0]["envFrom"] == [
        {"secretRef": {"name": "tenant-a-data"}}, {"secretRef": {"name": "tenant-a-state"}}]


def test_a_state_pvc_is_mounted_read_write_and_is_where_the_client_keeps_its_state():
    job = job_manifest(_round(_config(clients=[{"name": "a", "state_uri": STOLEN}])),
                       _client(state={"pvc": {"claimName": "tenant-a-state", "path": "/fedfm/"}}))
    pod = job["spec"]["template"]["spec"]
    assert {"name": "state", "persistentVolumeClaim": {"claimName": "tenant-a-state"}} in pod["volumes"]
    assert {"name": "state", "mountPath": "/state"} in pod["containers"][0]["volumeMounts"]
    assert _job_config(job)["clients"] == [{"name": "a", "state_uri": "/state/fedfm"}]


def test_a_tenant_without_a_state_location_is_not_given_the_platforms(monkeypatch):
    """No spec.state: a round that needs one is refused, naming what the client keeps and where to say it; a
    round that needs none runs, with no state location at all (not the one the platform wrote)."""
    secure = _config(clients=[{"name": "a", "state_uri": STOLEN}], secure_aggregation={"enabled": True})
    apiserver = Apiserver(monkeypatch, _round(secure), _client())
    status = apiserver.start()
    assert status["phase"] == FAILED and status["reason"] == "NoStateLocation" and not apiserver.jobs
    assert status["message"] == ("client a keeps its secure-aggregation keys and plain update in storage only it "
                                 "can read, and FederatedClient tenant-a/a has no spec.state saying where")
    assert apiserver.events == ["NoStateLocation"]

    plain = Apiserver(monkeypatch, _round(_config(clients=[{"name": "a", "state_uri": STOLEN}])), _client())
    assert plain.start()["phase"] == PENDING
    assert _job_config(plain.jobs[0])["clients"] == [{"name": "a", "state_uri": None}]


@pytest.mark.parametrize("field", ["clients", "execution"])
def test_a_kubernetes_federation_config_cannot_choose_where_tenants_keep_state(field):
    config = {"execution": {"mode": "kubernetes", "storage_uri": "s3://fed/store"}, "data": {"labels": ["x", "y"]},
              "clients": ["a", "b"]}
    if field == "clients":
        config["clients"] = [{"name": "a", "state_uri": STOLEN}, "b"]
        named = "clients[a].state_uri"
    else:
        config["execution"]["client_state_uri"] = STOLEN
        named = "execution.client_state_uri"
    with pytest.raises(ConfigError, match=re.escape(named) + r": in kubernetes mode each tenant keeps its state "
                                          r"where its FederatedClient's spec.state says"):
        FederationConfig.parse(config)
    config["secure_aggregation"] = {"enabled": True}  # without them, secure aggregation is no longer refused
    config["clients"], config["execution"] = ["a", "b", "c"], {"mode": "kubernetes", "storage_uri": "s3://fed/store"}
    from fedfm.strategies import check_federation

    check_federation(FederationConfig.parse(config))


# --- finding 10: the tenant says which code may run next to its data -----------------------------------------


def test_remote_code_is_refused_unless_the_tenant_allows_it(monkeypatch):
    remote = _config(model={**MODEL, "trust_remote_code": True})
    apiserver = Apiserver(monkeypatch, _round(remote), _client())
    status = apiserver.start()
    assert status["phase"] == FAILED and status["reason"] == "RemoteCodeNotAllowed" and not apiserver.jobs
    assert "FederatedClient tenant-a/a does not allow remote code" in status["message"]

    allowing = Apiserver(monkeypatch, _round(remote), _client(modelPolicy={"allowRemoteCode": True}))
    assert allowing.start()["phase"] == PENDING and len(allowing.jobs) == 1


@pytest.mark.parametrize("allowed, model, runs", [
    (["sentence-transformers/all-MiniLM-L6-v2@c9745ed1"], MODEL, True),
    (["sentence-transformers/all-MiniLM-L6-v2@c9745ed1"], {**MODEL, "revision": "main"}, False),
    (["sentence-transformers/all-MiniLM-L6-v2@c9745ed1"], {"name_or_path": MODEL["name_or_path"]}, False),
    (["sentence-transformers/*"], {"name_or_path": MODEL["name_or_path"]}, True),
    (["sentence-transformers/*"], {"name_or_path": "attacker/all-MiniLM-L6-v2"}, False),
    ([], MODEL, False),
])
def test_only_the_models_and_revisions_the_tenant_allows_run_next_to_its_data(monkeypatch, allowed, model, runs):
    apiserver = Apiserver(monkeypatch, _round(_config(model=model)), _client(modelPolicy={"allowedModels": allowed}))
    status = apiserver.start()
    assert (status["phase"], len(apiserver.jobs)) == ((PENDING, 1) if runs else (FAILED, 0))
    if not runs:
        assert status["reason"] == "ModelNotAllowed" and model["name_or_path"] in status["message"]
        assert "spec.modelPolicy.allowedModels" in status["message"]


def test_without_a_model_policy_any_model_runs_but_never_its_remote_code(monkeypatch):
    other = Apiserver(monkeypatch, _round(_config(model={"name_or_path": "Qwen/Qwen2.5-0.5B"})), _client())
    assert other.start()["phase"] == PENDING
    remote = Apiserver(monkeypatch, _round(_config(model={"name_or_path": "Qwen/Qwen2.5-0.5B",
                                                          "trust_remote_code": True})), _client())
    assert remote.start()["reason"] == "RemoteCodeNotAllowed"


# --- finding 3: the keys secure aggregation's messages are verified with are the tenants' own ---------------------


def _secure_round(step: str) -> dict:
    client_round = _round(_config(secure_aggregation={"enabled": True}))
    client_round["spec"].update(purpose=SECURE, secureStep=step, inputs={"keys": "s3://fed/keys.json"})
    return client_round


def test_a_secure_step_of_a_tenant_with_no_registered_signing_key_is_refused(monkeypatch):
    apiserver = Apiserver(monkeypatch, _secure_round("advertise"),
                          _client(state={"uri": "s3://tenant-a-private/fedfm"}))
    status = apiserver.start()
    assert status["phase"] == FAILED and status["reason"] == "NoSigningKey" and not apiserver.jobs
    assert "registers no signing key (spec.signingKey)" in status["message"]


def test_a_secure_steps_job_verifies_its_peers_with_the_keys_their_federated_clients_register(monkeypatch):
    """The registry a tenant's Job verifies its peers' advertisements with comes from the FederatedClients of
    its federation, never from the round's config: a platform that writes keys of its own into the config
    (to substitute a peer's) reaches nothing."""
    keys = {name: signing.new_identity(name)[1] for name in ("a", "b", "intruder")}
    members = [{"metadata": {"name": name, "namespace": f"tenant-{name}"},
                "spec": {"federationRef": {"name": "fed" if name != "intruder" else "other", "namespace": "platform"},
                         "signingKey": keys[name]}} for name in ("a", "b", "intruder")]
    members.append({"metadata": {"name": "unkeyed", "namespace": "tenant-u"},
                    "spec": {"federationRef": {"name": "fed", "namespace": "platform"}}})
    monkeypatch.setattr(kube, "list_objects", lambda plural, namespace=None, selector="": copy.deepcopy(members))
    hostile = _secure_round("share")
    hostile["spec"]["config"]["signing_keys"] = {"b": keys["intruder"]}
    apiserver = Apiserver(monkeypatch, hostile, _client(state={"uri": "s3://tenant-a-private/fedfm"},
                                                        signingKey=keys["a"]))
    assert apiserver.start()["phase"] == PENDING
    container = apiserver.jobs[0]["spec"]["template"]["spec"]["containers"][0]
    env = {item["name"]: item["value"] for item in container["env"]}
    assert json.loads(env[signing.REGISTRY_ENV]) == {"a": keys["a"], "b": keys["b"]}
    # and a plain fine-tune's Job gets no registry: it signs nothing
    plain = Apiserver(monkeypatch, _round(_config()), _client(signingKey=keys["a"]))
    plain.start()
    assert signing.REGISTRY_ENV not in json.dumps(plain.jobs[0])


# --- finding 1: each tenant reaches the federation's storage with its own key ----------------------------------

PLATFORM_STORE = "s3://platform-bucket/federations"


def test_a_tenants_job_reaches_the_federations_storage_with_its_own_key_and_never_the_platforms(monkeypatch):
    """The operator holds the platform's key (its environment); a tenant's Job gets the federation's location
    and, from the tenant's own Secret, the tenant's key, under names the tenant's env cannot replace."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "the-platforms-secret")
    tenant = _client(federationStorage={"secretRef": {"name": "a-federation"}},
                     env=[{"name": grants.ROOT_ENV, "value": "s3://elsewhere"},
                          {"name": grants.CREDENTIAL_ENV["AWS_ACCESS_KEY_ID"], "value": "mine"}])
    apiserver = Apiserver(monkeypatch, _round(_config()), tenant, storage_uri=PLATFORM_STORE)
    assert apiserver.start()["phase"] == PENDING
    job = apiserver.jobs[0]
    env = job["spec"]["template"]["spec"]["containers"][0]["env"]
    values = {item["name"]: item.get("value") for item in env}
    assert values[grants.ROOT_ENV] == f"{PLATFORM_STORE}/fed"
    references = {item["name"]: item["valueFrom"]["secretKeyRef"] for item in env if "valueFrom" in item}
    assert references == {variable: {"name": "a-federation", "key": key, "optional": key not in grants.REQUIRED_KEYS}
                          for key, variable in grants.CREDENTIAL_ENV.items()}
    assert [item["name"] for item in env].count(grants.ROOT_ENV) == 1 and "s3://elsewhere" not in json.dumps(job)
    assert "the-platforms-secret" not in json.dumps(job) and "mine" not in json.dumps(job)


def test_a_tenant_with_no_key_of_its_own_to_remote_federation_storage_is_refused(monkeypatch):
    apiserver = Apiserver(monkeypatch, _round(_config()), _client(), storage_uri=PLATFORM_STORE)
    status = apiserver.start()
    assert status["phase"] == FAILED and status["reason"] == "NoStorageGrant" and not apiserver.jobs
    assert "spec.federationStorage.secretRef" in status["message"] and "--client a" in status["message"]
    # storage every Pod mounts (a shared volume) has no keys to hand out
    local = Apiserver(monkeypatch, _round(_config()), _client(), storage_uri="file:///mnt/federation")
    assert local.start()["phase"] == PENDING and grants.ROOT_ENV not in json.dumps(local.jobs[0])


def test_the_tenants_key_is_used_under_the_federations_location_only():
    env = {grants.ROOT_ENV: "s3://bucket/store/fed", grants.CREDENTIAL_ENV["AWS_ACCESS_KEY_ID"]: "id",
           grants.CREDENTIAL_ENV["AWS_SECRET_ACCESS_KEY"]: "secret"}
    assert grants.granted_options("s3://bucket/store/fed/tenants/a/x", env)["key"] == "id"
    assert grants.granted_options("s3://bucket/store/fed2/x", env) is None  # a sibling that shares the prefix
    assert grants.granted_options("s3://tenant-a-private/state", env) is None  # the tenant's own storage
    assert grants.granted_options("s3://bucket/store/fed/x", {grants.ROOT_ENV: "s3://bucket/store/fed"}) is None
