"""Multi-node tenants through Kubeflow Trainer (issue 19): the TrainJob a multi-node client's fine-tune becomes
(valid against Trainer's own TrainJob CRD, on the runtime the chart installs, with everything a one-node
client's Job has), the operator following its conditions to the round's phases, the clear condition and refusal
where Trainer is missing, and the training command's side: the node layout Trainer's environment gives, and
the tenant's Secrets as files. tests/cluster/test_multi_node.py runs it on the real control plane and kubelet."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from fedfm import storage
from fedfm.errors import TrainingError
from fedfm.operators import handlers, kube, trainer
from fedfm.operators.api import EVALUATE, FAILED, PENDING, RUNNING, SECURE, TIMED_OUT, TRAIN
from fedfm.operators.jobs import TRAINER_NODE, job_manifest, train_job_manifest
from fedfm.training import NodeLayout, node_layout
from test_chart import _openapi_problems, find, render

VENDOR = Path(__file__).resolve().parents[2].parent / "shared" / "vendor" / "kubeflow-trainer"
RUNTIME = "fedfm-deepspeed"


def _round(purpose: str = TRAIN, **spec) -> dict:
    return {"metadata": {"name": "fed-r1-train-a", "namespace": "tenant-a", "uid": "uid-1", "resourceVersion": "1"},
            "spec": {"federation": {"name": "fed", "namespace": "platform"}, "client": "a", "round": 1,
                     "purpose": purpose, "globalAdapterURI": "s3://b/g.safetensors",
                     "outputURI": "s3://b/u.safetensors", "config": {"name": "fed"}, **spec}}


def _client(**spec) -> dict:
    base = {"federationRef": {"name": "fed", "namespace": "platform"}, "image": "registry/fedfm:1",
            "serviceAccountName": "tenant-sa",
            "data": {"pvc": {"claimName": "data", "path": "train.csv"}, "secretRef": {"name": "data-creds"}},
            "state": {"pvc": {"claimName": "state", "path": "fedfm"}, "secretRef": {"name": "state-creds"}},
            "resources": {"cpu": 4, "memory": "16Gi", "gpus": 2, "nodes": 3, "nodeSelector": {"pool": "gpu"},
                          "tolerations": [{"key": "gpu", "operator": "Exists"}]}}
    return {"metadata": {"name": "a", "namespace": "tenant-a"}, "spec": {**base, **spec}, "status": {"phase": "Ready"}}


def _trainer_crd(kind: str) -> dict:
    name = {"TrainJob": "trainjobs", "ClusterTrainingRuntime": "clustertrainingruntimes"}[kind]
    return yaml.safe_load((VENDOR / "crds" / f"trainer.kubeflow.org_{name}.yaml").read_text())


def test_a_multi_node_fine_tune_is_a_trainjob_with_everything_the_one_node_job_has():
    client_round, federated_client = _round(deadlineSeconds=90), _client()
    train_job = train_job_manifest(client_round, federated_client, RUNTIME, storage_root="s3://fed-store/fed")
    job = job_manifest(client_round, federated_client, storage_root="s3://fed-store/fed")
    job_pod = job["spec"]["template"]["spec"]
    job_container = job_pod["containers"][0]

    assert train_job["kind"] == "TrainJob" and train_job["apiVersion"] == "trainer.kubeflow.org/v1alpha1"
    assert train_job["metadata"] == job["metadata"]  # same name, namespace, labels; owned by the ClientRound
    spec = train_job["spec"]
    assert spec["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime",
                                  "name": RUNTIME}
    assert spec["activeDeadlineSeconds"] == job["spec"]["activeDeadlineSeconds"] == 90
    trainer_spec = spec["trainer"]
    assert (trainer_spec["numNodes"], trainer_spec["numProcPerNode"]) == (3, 2)
    # one data-parallel group of nodes × GPUs processes: the command asks for all of them
    assert trainer_spec["command"] == job_container["command"]
    assert trainer_spec["command"][trainer_spec["command"].index("--world-size") + 1] == "6"
    assert trainer_spec["image"] == job_container["image"] and trainer_spec["resourcesPerNode"] == \
        job_container["resources"] == {"requests": {"cpu": "4", "memory": "16Gi"},
                                       "limits": {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "2"}}
    env = {item["name"]: item for item in trainer_spec["env"]}
    assert [item for item in trainer_spec["env"] if item["name"] != storage.CREDENTIAL_DIRS_ENV] == \
        job_container["env"]
    assert env["OMP_NUM_THREADS"]["value"] == "2"  # 4 CPUs per node, 2 processes on each

    [patch] = spec["runtimePatches"]
    assert patch["manager"] == "fedfm.dev/operator"
    [node] = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert node["name"] == TRAINER_NODE
    pod = node["template"]["spec"]["template"]["spec"]
    assert node["template"]["spec"]["template"]["metadata"]["labels"] == job["spec"]["template"]["metadata"]["labels"]
    for field in ("serviceAccountName", "securityContext", "nodeSelector", "tolerations",
                  "terminationGracePeriodSeconds"):
        assert pod[field] == job_pod[field], field
    [container] = pod["containers"]
    assert container["name"] == TRAINER_NODE and container["securityContext"] == job_container["securityContext"]
    # the same volumes and mounts (data read-only, state read-write, the scratch), plus each Secret as files
    # where a Job has envFrom, which a TrainJob cannot patch in
    assert all(volume in pod["volumes"] for volume in job_pod["volumes"])
    assert all(mount in container["volumeMounts"] for mount in job_container["volumeMounts"])
    secrets = [v for v in pod["volumes"] if "secret" in v]
    assert [v["secret"]["secretName"] for v in secrets] == ["data-creds", "state-creds"]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert all(mounts[v["name"]]["readOnly"] for v in secrets)
    assert env[storage.CREDENTIAL_DIRS_ENV]["value"] == ":".join(mounts[v["name"]]["mountPath"] for v in secrets)
    assert job_container["envFrom"] == [{"secretRef": {"name": "data-creds"}}, {"secretRef": {"name": "state-creds"}}]

    # what Trainer's apiserver takes: valid against its TrainJob CRD, no field it would drop
    schema = _trainer_crd("TrainJob")["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert _openapi_problems(train_job["spec"], schema["properties"]["spec"], "$.spec") == []


def test_only_a_multi_node_clients_fine_tune_is_a_trainjob(monkeypatch):
    # secure steps: the federation's members and their registered keys
    monkeypatch.setattr(handlers, "_enrolled", lambda name, namespace: [_client(signingKey="0a" * 32)])
    for purpose, step, nodes, kind in ((TRAIN, None, 2, "TrainJob"), (SECURE, "train", 2, "TrainJob"),
                                       (SECURE, "reveal", 2, "Job"), (EVALUATE, None, 2, "Job"),
                                       (TRAIN, None, 1, "Job")):
        status = _start(_round(purpose, **({"secureStep": step} if step else {})),
                        _client(resources={"nodes": nodes}, signingKey="0a" * 32), runtime=RUNTIME)
        assert status.get("jobKind") == kind, (purpose, step, nodes, status)
        [created] = status["_created"]
        assert created["kind"] == kind


class Apiserver:
    """What the handlers read and write: one ClientRound, its FederatedClient and Federation, the Jobs and
    TrainJobs they create, the Trainer API's presence."""

    def __init__(self, monkeypatch, client_round: dict, federated_client: dict, runtime: str | None,
                 trainer_installed: bool = True):
        self.round, self.client, self.created, self.deleted, self.events = client_round, federated_client, [], [], []
        federation = {"metadata": {"name": "fed", "namespace": "platform"},
                      "spec": {"config": {key: client_round["spec"]["config"].get(key)
                                          for key in handlers._MUST_MATCH}}}
        self.installed = trainer_installed
        monkeypatch.setattr(trainer, "_runtime", [runtime] if runtime else [])
        monkeypatch.setattr(trainer, "_discovered", {})  # what discovery said of another cluster
        monkeypatch.setattr(kube, "get_federated_client", lambda namespace, name: copy.deepcopy(self.client))
        monkeypatch.setattr(kube, "get_federation", lambda namespace, name: copy.deepcopy(federation))
        monkeypatch.setattr(kube, "get_client_round", lambda namespace, name: copy.deepcopy(self.round))
        monkeypatch.setattr(kube, "patch_status", self.patch_status)
        monkeypatch.setattr(kube, "batch", lambda: self)
        monkeypatch.setattr(kube, "custom", lambda: self)
        monkeypatch.setattr(kube, "delete_job", lambda namespace, name: self.deleted.append(("Job", name)))
        monkeypatch.setattr(handlers, "_event", lambda obj, normal, reason, message: self.events.append(reason))
        monkeypatch.setattr(handlers.metrics, "client_round_finished", lambda *args: None)

    def patch_status(self, plural, namespace, name, status, resource_version=None):
        self.round.setdefault("status", {}).update({key: value for key, value in status.items() if value is not None})

    def create_namespaced_job(self, namespace, body):
        self.created.append(body)

    def get_api_resources(self, group, version):
        if not self.installed:
            raise ApiException(status=404, reason="Not Found")

        class Resource:
            name = "trainjobs"

        return type("List", (), {"resources": [Resource()]})()

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        if not self.installed:
            raise ApiException(status=404, reason="Not Found")
        self.created.append(body)

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name, propagation_policy=None):
        self.deleted.append((plural, name))


def _start(client_round: dict, federated_client: dict, runtime: str | None, installed: bool = True) -> dict:
    """The round's status after the operator's create handler, and what it created."""
    with pytest.MonkeyPatch.context() as patcher:
        cluster = Apiserver(patcher, client_round, federated_client, runtime, installed)
        patch = type("Patch", (), {"status": {}})()
        body = copy.deepcopy(client_round)
        handlers.start_client_round(body=body, spec=body["spec"], status=body.get("status") or {},
                                    name=body["metadata"]["name"], namespace="tenant-a", patch=patch)
        return {**(cluster.round.get("status") or {}), **patch.status, "_created": cluster.created}


@pytest.mark.parametrize("runtime, installed, reason", [(None, True, "MultiNodeDisabled"),
                                                        (RUNTIME, False, "TrainerNotInstalled")])
def test_without_trainer_a_multi_node_round_is_refused_with_why_and_the_client_says_so(runtime, installed, reason):
    status = _start(_round(), _client(), runtime=runtime, installed=installed)
    assert status["phase"] == FAILED and status["reason"] == reason and status["_created"] == []
    assert "resources.nodes" in status["message"] or "Trainer" in status["message"]

    with pytest.MonkeyPatch.context() as patcher:
        Apiserver(patcher, _round(), _client(), runtime, installed)
        conditions = handlers._multi_node_condition([], _client())
        assert [(c["type"], c["status"], c["reason"]) for c in conditions] == [("MultiNode", "False", reason)]
        Apiserver(patcher, _round(), _client(), RUNTIME, True)
        [condition] = handlers._multi_node_condition(conditions, _client())
        assert (condition["status"], condition["reason"]) == ("True", "TrainJob")
        assert "3 nodes" in condition["message"] and RUNTIME in condition["message"]
        assert handlers._multi_node_condition(conditions, _client(resources={"nodes": 1})) == []


def test_the_trainjobs_conditions_are_the_rounds_phases(monkeypatch):
    def train_job(conditions=(), active=0):
        return {"metadata": {"labels": {"fedfm.dev/client-round": "fed-r1-train-a"}},
                "status": {"conditions": list(conditions), "jobsStatus": [{"name": "node", "active": active}]}}

    def phase_after(event: dict, status: dict | None = None) -> dict:
        client_round = _round(deadlineSeconds=60)
        client_round["status"] = status or {"phase": PENDING, "jobKind": "TrainJob"}
        cluster = Apiserver(monkeypatch, client_round, _client(), RUNTIME)
        completed = []
        monkeypatch.setattr(handlers, "_complete", lambda r: completed.append(r["metadata"]["name"]))
        handlers.train_job_changed(body=event, namespace="tenant-a")
        return {**cluster.round["status"], "completed": completed}

    assert phase_after(train_job())["phase"] == PENDING  # created, no node runs yet
    assert phase_after(train_job(active=1))["phase"] == RUNNING
    assert phase_after(train_job([{"type": "Complete", "status": "True"}]))["completed"] == ["fed-r1-train-a"]
    failed = phase_after(train_job([{"type": "Failed", "status": "True", "reason": "FailedJobs",
                                     "message": "node 1 exited with 1"}]))
    assert (failed["phase"], failed["reason"]) == (FAILED, "TrainJobFailed") and "node 1 exited" in failed["message"]
    late = phase_after(train_job([{"type": "Failed", "status": "True", "reason": "DeadlineExceeded"}]))
    assert (late["phase"], late["reason"]) == (TIMED_OUT, "DeadlineExceeded")
    # a finished round stays as it ended, whatever its TrainJob says later
    done = phase_after(train_job(active=1), {"phase": "Succeeded", "jobKind": "TrainJob"})
    assert done["phase"] == "Succeeded" and done["completed"] == []


def test_a_jobs_status_is_the_rounds_phase_as_a_trainjobs_is(monkeypatch):
    """One way to follow what runs a round: a Job's status and a TrainJob's conditions reach the same phases."""
    def job(**status):
        return {"metadata": {"labels": {"fedfm.dev/client-round": "fed-r1-train-a"}}, "status": status}

    def phase_after(event: dict) -> dict:
        client_round = _round(deadlineSeconds=60)
        client_round["status"] = {"phase": PENDING, "jobKind": "Job"}
        cluster = Apiserver(monkeypatch, client_round, _client(resources={}), RUNTIME)
        completed = []
        monkeypatch.setattr(handlers, "_complete", lambda r: completed.append(r["metadata"]["name"]))
        handlers.job_changed(body=event, namespace="tenant-a")
        return {**cluster.round["status"], "completed": completed}

    assert phase_after(job())["phase"] == PENDING
    assert phase_after(job(active=1))["phase"] == RUNNING
    assert phase_after(job(succeeded=1))["completed"] == ["fed-r1-train-a"]
    failed = phase_after(job(failed=1, conditions=[{"type": "Failed", "status": "True",
                                                    "reason": "BackoffLimitExceeded",
                                                    "message": "Job has reached the specified backoff limit"}]))
    assert (failed["phase"], failed["reason"]) == (FAILED, "JobFailed")
    assert failed["message"] == "the Job's pod failed: Job has reached the specified backoff limit"
    late = phase_after(job(conditions=[{"type": "Failed", "status": "True", "reason": "DeadlineExceeded"}]))
    assert (late["phase"], late["reason"]) == (TIMED_OUT, "DeadlineExceeded")


def test_at_its_deadline_a_multi_node_round_times_out_and_its_trainjob_is_deleted(monkeypatch):
    client_round = _round(deadlineSeconds=5)
    client_round["status"] = {"phase": RUNNING, "jobKind": "TrainJob", "deadline": kube.iso(0)}
    cluster = Apiserver(monkeypatch, client_round, _client(), RUNTIME)
    handlers.enforce_deadline(body=copy.deepcopy(client_round), spec=client_round["spec"],
                              status=client_round["status"])
    assert cluster.round["status"]["phase"] == TIMED_OUT
    assert cluster.deleted == [("trainjobs", "fed-r1-train-a")]
    handlers.client_round_deleted(body=copy.deepcopy(cluster.round))
    assert cluster.deleted[-1] == ("trainjobs", "fed-r1-train-a")


def test_an_operator_restart_adopts_the_trainjob_it_created():
    with pytest.MonkeyPatch.context() as patcher:
        cluster = Apiserver(patcher, _round(), _client(), RUNTIME)

        def exists(*args, **kwargs):
            raise ApiException(status=409, reason="AlreadyExists")

        cluster.create_namespaced_custom_object = exists
        patch = type("Patch", (), {"status": {}})()
        body = _round()
        handlers.start_client_round(body=body, spec=body["spec"], status={}, name="fed-r1-train-a",
                                    namespace="tenant-a", patch=patch)
        assert patch.status["jobKind"] == "TrainJob" and cluster.round["status"]["phase"] == PENDING


def test_the_chart_installs_the_runtime_the_trainjobs_patch_and_runs_the_operator_with_it():
    assert not find(render(), "ClusterTrainingRuntime")
    objects = render({"trainer": {"enabled": True, "runtimeName": RUNTIME}})
    [runtime] = find(objects, "ClusterTrainingRuntime", RUNTIME)
    schema = _trainer_crd("ClusterTrainingRuntime")["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert _openapi_problems(runtime["spec"], schema["properties"]["spec"], "$.spec") == []
    # the replicated Job and container every TrainJob patches, marked as the trainer step Trainer configures
    [node] = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    assert node["name"] == TRAINER_NODE
    assert node["template"]["metadata"]["labels"]["trainer.kubeflow.org/trainjob-ancestor-step"] == "trainer"
    assert [c["name"] for c in node["template"]["spec"]["template"]["spec"]["containers"]] == [TRAINER_NODE]
    assert "torch" in runtime["spec"]["mlPolicy"]
    [deployment] = find(objects, "Deployment")
    assert f"--training-runtime={RUNTIME}" in deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert not any(arg.startswith("--training-runtime") for arg in
                   find(render(), "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["args"])
    # the operator may create, follow and delete TrainJobs, and nothing more of Trainer's
    [role] = find(objects, "ClusterRole", "fedfm-operator")
    assert [r["verbs"] for r in role["rules"] if "trainer.kubeflow.org" in r["apiGroups"]] == \
        [["get", "list", "watch", "create", "delete"]]
    assert all(r["resources"] == ["trainjobs"] for r in role["rules"] if "trainer.kubeflow.org" in r["apiGroups"])


@pytest.mark.parametrize("environ, layout", [
    ({}, (1, 0, 4)),
    ({"PET_NNODES": "1"}, (1, 0, 4)),
    ({"PET_NNODES": "2", "PET_NODE_RANK": "1", "PET_MASTER_ADDR": "10.0.0.7", "PET_MASTER_PORT": "29400"},
     NodeLayout(2, 1, 2, "10.0.0.7", 29400)),
    ({"PET_NNODES": "4", "PET_NODE_RANK": "0", "PET_MASTER_ADDR": "m", "PET_MASTER_PORT": "1",
      "PET_NPROC_PER_NODE": "1"}, NodeLayout(4, 0, 1, "m", 1)),
])
def test_the_node_layout_is_what_trainers_environment_says(environ, layout):
    found = node_layout("a", 4, environ)
    if isinstance(layout, tuple):
        assert (found.nodes, found.node_rank, found.processes, found.master_addr) == (*layout, "127.0.0.1")
    else:
        assert found == layout


@pytest.mark.parametrize("environ, message", [
    ({"PET_NNODES": "2", "PET_NODE_RANK": "0", "PET_MASTER_ADDR": "m"}, "PET_MASTER_PORT"),
    ({"PET_NNODES": "3", "PET_NODE_RANK": "0", "PET_MASTER_ADDR": "m", "PET_MASTER_PORT": "1"}, "3 nodes"),
    ({"PET_NNODES": "2", "PET_NODE_RANK": "2", "PET_MASTER_ADDR": "m", "PET_MASTER_PORT": "1"}, "node rank 2"),
    ({"PET_NNODES": "2", "PET_NODE_RANK": "x", "PET_MASTER_ADDR": "m", "PET_MASTER_PORT": "1"}, "not numeric"),
])
def test_a_layout_that_disagrees_with_the_config_is_refused_naming_it(environ, message):
    with pytest.raises(TrainingError, match=message):
        node_layout("a", 4, environ)


def test_the_tenants_secrets_as_files_become_its_environment_with_a_jobs_precedence(tmp_path):
    data, state = tmp_path / "0", tmp_path / "1"
    for directory, values in ((data, {"AWS_ACCESS_KEY_ID": "data-key", "DATA_ONLY": "d"}),
                              (state, {"AWS_ACCESS_KEY_ID": "state-key", "HOME": "/elsewhere"})):
        (directory / "..data").mkdir(parents=True)  # what a mounted Secret looks like: keys link into ..data
        for name, value in values.items():
            (directory / "..data" / name).write_text(value)
            (directory / name).symlink_to(Path("..data") / name)
    environ = {storage.CREDENTIAL_DIRS_ENV: f"{data}:{state}", "HOME": "/tmp"}
    storage.credentials_from_files(environ)
    # the state's Secret wins over the data's (as later envFrom sources do); the Pod's own env wins over both
    assert environ["AWS_ACCESS_KEY_ID"] == "state-key" and environ["DATA_ONLY"] == "d" and environ["HOME"] == "/tmp"
    assert "..data" not in environ and json.dumps(environ)


def test_a_federations_timer_derives_every_members_status_from_one_list_of_rounds(monkeypatch):
    """bench/scale.py: a status timer per FederatedClient every 2 s (two reads each) kept a 2-core control plane
    busy at 500 tenants, and ClientRounds waited minutes for their Jobs. The Federation's timer reads the members
    and the federation's rounds once, derives each member's status from them and patches only what changed."""
    def member(name: str, status: dict | None = None) -> dict:
        return {"apiVersion": "fedfm.dev/v1alpha1", "kind": "FederatedClient",
                "metadata": {"name": name, "namespace": f"tenant-{name}", "uid": name, "labels": {"pool": "x"}},
                "spec": {"federationRef": {"name": "fed", "namespace": "platform"}}, "status": status or {}}

    def client_round(client: str, **status) -> dict:
        return {"metadata": {"name": f"fed-r1-train-{client}", "namespace": f"tenant-{client}",
                             "labels": {"fedfm.dev/client": client}, "creationTimestamp": "2026-12-06T00:00:00Z"},
                "spec": {"federation": {"name": "fed", "namespace": "platform"}, "client": client, "round": 1,
                         "purpose": TRAIN}, "status": status}

    members = [member("a"), member("b"), member("c", {"phase": "Ready"})]
    rounds = [client_round("a", phase=RUNNING), client_round("b", phase=FAILED, reason="InvalidUpdate",
                                                             message="NaN", finishedAt="2026-12-06T00:01:00Z")]
    reads, patched = [], {}

    def list_objects(plural, namespace=None, label_selector=""):
        reads.append(plural)
        return copy.deepcopy(members if plural == "federatedclients" else rounds)

    def refused(*args, **kwargs):
        raise AssertionError("a read per member")

    monkeypatch.setattr(kube, "list_objects", list_objects)
    monkeypatch.setattr(kube, "get_federated_client", refused)
    monkeypatch.setattr(kube, "get_client_round", refused)
    monkeypatch.setattr(kube, "patch_status", lambda plural, namespace, name, status, version=None:
                        patched.setdefault(name, {}).update(status))
    monkeypatch.setattr(handlers, "_event", lambda obj, normal, reason, message: None)
    federation = {"metadata": {"name": "fed", "namespace": "platform", "annotations": {}},
                  "spec": {"config": {"name": "fed"}, "clientSelector": {"matchLabels": {"pool": "x"}}}}
    patch = type("Patch", (), {"status": {}})()
    handlers.federation_status(body=federation, spec=federation["spec"], status={}, name="fed",
                               namespace="platform", patch=patch)
    assert sorted(reads) == ["clientrounds", "federatedclients"]
    assert (patched["a"]["phase"], patched["b"]["phase"]) == ("Training", "Quarantined")
    assert "conditions" in patched["c"] and "phase" not in patched["c"]  # only what changed: c was Ready
    assert [m["phase"] for m in patch.status["members"]] == ["Training", "Quarantined", "Ready"]
    assert patch.status["membersReady"] == 2


def test_an_s3_endpoint_among_the_secrets_files_reaches_fsspec_imported_before(tmp_path, monkeypatch):
    """A tenant's Secret may carry fsspec's own settings (FSSPEC_S3_ENDPOINT_URL for a MinIO): fsspec reads them
    when it is imported, before the files are read, so the exported values must reach its config too (the
    secure train step's parent process reads the tenant's state with them)."""
    import fsspec.config

    (tmp_path / "0").mkdir()
    (tmp_path / "0" / "FSSPEC_S3_ENDPOINT_URL").write_text("http://minio.tenant-a:9000")
    monkeypatch.setenv(storage.CREDENTIAL_DIRS_ENV, str(tmp_path / "0"))
    monkeypatch.delenv("FSSPEC_S3_ENDPOINT_URL", raising=False)
    monkeypatch.setattr(fsspec.config, "conf", {})
    storage.credentials_from_files()
    assert fsspec.config.conf["s3"]["endpoint_url"] == "http://minio.tenant-a:9000"
