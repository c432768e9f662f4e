"""The operator's objects without a cluster: CRDs, Jobs, names, selectors, RBAC files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from fedfm.config import FederationConfig
from fedfm.operators import crds, rbac
from fedfm.operators.api import EVALUATE, SECURE, TRAIN, client_round_name, condition, set_condition
from fedfm.operators.jobs import job_manifest
from fedfm.operators.kube import selector_matches

ROOT = Path(__file__).resolve().parents[2]


def test_committed_crds_and_roles_are_what_the_code_generates():
    for plural, crd in crds.all_crds().items():
        path = ROOT / "charts" / "fedfm" / "crds" / f"{plural}.fedfm.dev.yaml"
        assert path.read_text() == crds.render(crd), f"regenerate {path} (python -m fedfm.operators.crds --write ...)"
        assert "&id0" not in path.read_text()  # shared sub-schemas are written out, not YAML aliases
    for file_name, manifest in rbac.static_roles().items():
        assert (ROOT / "charts" / "fedfm" / "rbac" / file_name).read_text() == rbac.render(manifest)


def _schema_nodes(schema: dict, path: str = "$"):
    """Every schema node: the root, each property, array items and map values (not oneOf/anyOf branches,
    which are value validations)."""
    yield path, schema
    for name, child in (schema.get("properties") or {}).items():
        yield from _schema_nodes(child, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from _schema_nodes(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _schema_nodes(schema["additionalProperties"], f"{path}{{}}")


@pytest.mark.parametrize("plural", ["federations", "federatedclients", "clientrounds"])
def test_crd_schemas_are_structural(plural):
    """Every node typed (int-or-string excepted); no $ref, titles or free anyOf (what the apiserver refuses)."""
    schema = crds.all_crds()[plural]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in _schema_nodes(schema):
        assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{path} has no type"
        assert not {"$ref", "$defs", "title", "default"} & set(node), path
        assert "anyOf" not in node or node.get("x-kubernetes-int-or-string"), path


def test_the_federation_config_schema_follows_the_config_model():
    config = crds.federation_config_schema()["properties"]
    assert set(config) == set(FederationConfig.model_fields)
    assert config["training"]["properties"]["zero_stage"] == {"enum": [0, 1, 2, 3], "type": "integer"}
    assert config["model"]["properties"]["revision"] == {"type": "string", "nullable": True}
    assert config["data"]["properties"]["eval_fraction"]["exclusiveMinimum"] is True
    assert config["strategy"]["properties"]["params"]["x-kubernetes-preserve-unknown-fields"] is True
    assert config["clients"]["items"]["required"] == ["name"]


def _round(purpose=TRAIN, **spec):
    return {"metadata": {"name": "fed-r1-train-a", "namespace": "tenant-a", "uid": "uid-1"},
            "spec": {"federation": {"name": "fed", "namespace": "platform"}, "client": "a", "round": 1,
                     "purpose": purpose, "globalAdapterURI": "s3://b/g.safetensors",
                     "outputURI": "s3://b/u.safetensors", "config": {"name": "fed"}, **spec}}


def _client(**spec):
    base = {"federationRef": {"name": "fed", "namespace": "platform"}, "image": "registry/fedfm:1",
            "data": {"uri": "s3://tenant-a/train.csv"}}
    return {"metadata": {"name": "a", "namespace": "tenant-a"}, "spec": {**base, **spec}}


def test_a_training_round_becomes_a_job_in_the_tenant_namespace():
    job = job_manifest(_round(deadlineSeconds=90.5), _client(serviceAccountName="tenant-sa", data={
        "uri": "s3://tenant-a/train.csv", "secretRef": {"name": "creds"}},
        resources={"cpu": 4, "memory": "16Gi", "gpus": 2, "nodeSelector": {"pool": "gpu"},
                   "tolerations": [{"key": "gpu", "operator": "Exists"}]}))
    assert job["metadata"]["name"] == "fed-r1-train-a" and job["metadata"]["namespace"] == "tenant-a"
    owner = job["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == ("ClientRound", "fed-r1-train-a",
                                                                                 "uid-1", True)
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert spec["backoffLimit"] == 0 and spec["activeDeadlineSeconds"] == 90
    assert pod["serviceAccountName"] == "tenant-sa" and pod["restartPolicy"] == "Never"
    assert pod["nodeSelector"] == {"pool": "gpu"} and pod["tolerations"][0]["key"] == "gpu"
    container = pod["containers"][0]
    assert container["image"] == "registry/fedfm:1"
    assert container["command"] == ["fedfm", "client-train", "--global-adapter", "s3://b/g.safetensors",
                                    "--world-size", "2", "--client", "a", "--round", "1",
                                    "--output", "s3://b/u.safetensors", "--data", "s3://tenant-a/train.csv"]
    assert container["envFrom"] == [{"secretRef": {"name": "creds"}}]
    env = {item["name"]: item["value"] for item in container["env"]}
    assert json.loads(env["FEDFM_CONFIG"]) == {"name": "fed"}
    assert env["OMP_NUM_THREADS"] == "2"  # 4 CPUs for 2 DeepSpeed processes, not a thread per core of the node
    assert container["resources"] == {"requests": {"cpu": "4", "memory": "16Gi"},
                                      "limits": {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "2"}}
    assert job["spec"]["template"]["metadata"]["labels"]["fedfm.dev/client-round"] == "fed-r1-train-a"


@pytest.mark.parametrize("cpu, processes, threads", [(None, None, None), ("500m", None, "1"), ("3.5", None, "3"),
                                                     (8, 3, "2"), ("100m", 4, "1"), ("lots", None, None),
                                                     ("inf", None, None)])
def test_a_job_with_a_cpu_limit_runs_that_many_threads(cpu, processes, threads):
    resources = {key: value for key, value in (("cpu", cpu), ("processes", processes)) if value is not None}
    container = job_manifest(_round(), _client(resources=resources))["spec"]["template"]["spec"]["containers"][0]
    assert {item["name"]: item["value"] for item in container["env"]}.get("OMP_NUM_THREADS") == threads


def test_a_tenants_own_environment_reaches_its_jobs_but_cannot_replace_fedfms():
    """spec.env: the tenant's variables (OMP_NUM_THREADS given there wins over the one resources.cpu implies);
    the config the Job runs and its scratch HOME stay the operator's."""
    container = job_manifest(_round(), _client(resources={"cpu": 4}, env=[
        {"name": "HTTPS_PROXY", "value": "http://proxy:3128"}, {"name": "OMP_NUM_THREADS", "value": "1"},
        {"name": "FEDFM_CONFIG", "value": "{}"}, {"name": "HOME", "value": "/data"},
        {"name": "FEDFM_CREDENTIAL_DIRS", "value": "/data"}]))["spec"]["template"]["spec"]["containers"][0]
    names = [item["name"] for item in container["env"]]
    assert len(names) == len(set(names))  # one value each: no later entry silently wins
    env = {item["name"]: item["value"] for item in container["env"]}
    assert env["HTTPS_PROXY"] == "http://proxy:3128" and env["OMP_NUM_THREADS"] == "1"
    assert json.loads(env["FEDFM_CONFIG"]) == {"name": "fed"} and env["HOME"] != "/data"
    assert "FEDFM_CREDENTIAL_DIRS" not in env  # which files become the process's environment is FedFM's to say


def test_every_tenant_job_runs_non_root_on_a_read_only_root_with_only_a_scratch_writable():
    for purpose in (TRAIN, EVALUATE):
        pod = job_manifest(_round(purpose), _client())["spec"]["template"]["spec"]
        assert pod["securityContext"] == {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
        assert pod["volumes"] == [{"name": "scratch", "emptyDir": {}}]
        # stopped at its deadline, its Pod is killed within seconds, not after Kubernetes' default 30
        assert pod["terminationGracePeriodSeconds"] == 5
        container = pod["containers"][0]
        assert container["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                                                "readOnlyRootFilesystem": True, "runAsNonRoot": True}
        assert container["volumeMounts"] == [{"name": "scratch", "mountPath": "/tmp"}]
        # caches under HOME (DeepSpeed's, Triton's; the image puts Hugging Face's under /tmp) land in the scratch
        assert {"name": "HOME", "value": "/tmp"} in container["env"]


def test_pvc_data_is_mounted_read_only_and_evaluation_runs_client_evaluate():
    job = job_manifest(_round(EVALUATE), _client(data={"pvc": {"claimName": "tenant-data", "path": "/sets/a.csv"}},
                                                 resources={"processes": 3}))
    pod = job["spec"]["template"]["spec"]
    assert pod["volumes"][1:] == [{"name": "data", "persistentVolumeClaim": {"claimName": "tenant-data",
                                                                             "readOnly": True}}]
    container = pod["containers"][0]
    assert container["volumeMounts"][1:] == [{"name": "data", "mountPath": "/data", "readOnly": True}]
    assert container["command"][:2] == ["fedfm", "client-evaluate"]
    assert container["command"][-1] == "/data/sets/a.csv" and "--world-size" not in container["command"]
    assert "activeDeadlineSeconds" not in job["spec"] and "serviceAccountName" not in pod


def test_a_secure_aggregation_step_runs_client_secagg_with_its_inputs():
    job = job_manifest(_round(SECURE, secureStep="train", inputs={"keys": "s3://b/keys", "clip_norm": "0.5"}),
                       _client(resources={"gpus": 1}))
    assert job["spec"]["template"]["spec"]["containers"][0]["command"] == [
        "fedfm", "client-secagg", "--step", "train", "--input", "clip_norm=0.5", "--input", "keys=s3://b/keys",
        "--world-size", "1", "--client", "a", "--round", "1", "--output", "s3://b/u.safetensors",
        "--data", "s3://tenant-a/train.csv"]
    assert job["metadata"]["labels"]["fedfm.dev/purpose"] == "secureaggregation"
    for step in ("advertise", "share", "train", "reveal"):  # one ClientRound per step, each its own name
        assert client_round_name("fed", "run-1", 2, SECURE, "tenant-a", step).endswith(f"-r2-sa-{step}-tenant-a")


def test_client_round_names_are_stable_short_and_valid():
    name = client_round_name("fed", "run-123", 3, TRAIN, "tenant-a")
    assert name == client_round_name("fed", "run-123", 3, TRAIN, "tenant-a")
    assert name != client_round_name("fed", "run-124", 3, TRAIN, "tenant-a")
    assert name != client_round_name("fed", "run-123", 3, EVALUATE, "tenant-a")
    long = client_round_name("a-federation-with-a-rather-long-name", "x" * 36, 120, TRAIN,
                             "hospital-in-a-city-with-a-long-name")
    assert len(long) <= 63 and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", long)
    assert long != client_round_name("a-federation-with-a-rather-long-name", "x" * 36, 120, TRAIN,
                                     "hospital-in-a-city-with-a-long-name-2")


@pytest.mark.parametrize("selector, labels, selected", [
    (None, {"a": "1"}, True),
    ({"matchLabels": {"tier": "gold"}}, {"tier": "gold"}, True),
    ({"matchLabels": {"tier": "gold"}}, {"tier": "silver"}, False),
    ({"matchExpressions": [{"key": "region", "operator": "In", "values": ["eu", "us"]}]}, {"region": "eu"}, True),
    ({"matchExpressions": [{"key": "region", "operator": "NotIn", "values": ["eu"]}]}, {"region": "eu"}, False),
    ({"matchExpressions": [{"key": "blocked", "operator": "DoesNotExist"}]}, {"blocked": "x"}, False),
    ({"matchExpressions": [{"key": "team", "operator": "Exists"}]}, {}, False),
])
def test_label_selectors(selector, labels, selected):
    assert selector_matches(selector, labels) is selected


def test_conditions_keep_their_transition_time_until_they_change():
    first = set_condition(None, condition("Ready", True, "Ok", "fine", "t1"))
    same = set_condition(first, condition("Ready", True, "Ok", "fine", "t2"))
    assert same[0]["lastTransitionTime"] == "t1"
    changed = set_condition(same, condition("Ready", False, "Broken", "not fine", "t3"))
    assert changed == [condition("Ready", False, "Broken", "not fine", "t3")]
    both = set_condition(changed, condition("Other", True, "X", "y", "t4"))
    assert [c["type"] for c in both] == ["Ready", "Other"]


def test_rbac_gives_the_operator_no_secrets_or_pods():
    rules = rbac.operator_cluster_role()["rules"]
    resources = {resource for rule in rules for resource in rule["resources"]}
    assert "secrets" not in resources and "pods" not in resources
    pipeline = rbac.pipeline_manifests("platform", "pipeline-runner", ["tenant-a"])
    assert {(m["kind"], m["metadata"].get("namespace")) for m in pipeline} == {
        ("Role", "platform"), ("RoleBinding", "platform"), ("Role", "tenant-a"), ("RoleBinding", "tenant-a")}
    assert yaml.safe_load(rbac.render(rbac.pipeline_role()))["rules"][0]["verbs"] == ["create", "get", "list",
                                                                                      "watch"]
