"""Cluster mode end to end on a real control plane: the operator, its CRDs, per-tenant Jobs, RBAC.

The operator runs as a subprocess under its own service account (so its RBAC is the one the chart
ships), the pipeline runs as `fedfm run` under the pipeline's service account, and the fake kubelet
runs each Job's Pod command here — the real `fedfm client-train` on a tiny model — and writes the Pod's
status, as a kubelet would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from safetensors import safe_open

from kube import FakeKubelet, api_client_from_kubeconfig, free_ports, now_rfc3339, wait_for
from prometheus_server import Prometheus

from fedfm.adapters import AdapterMeta, load_adapter, save_adapter
from fedfm.builtin_data import load_builtin
from fedfm.config import FederationConfig
from fedfm.operators import rbac
from fedfm.operators.api import CLIENT_ROUNDS, FEDERATED_CLIENTS, FEDERATIONS, GROUP, LABEL_CLIENT_ROUND, VERSION

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

PLATFORM = "fedfm-platform"
OPERATOR_NAMESPACE = "fedfm-system"
PIPELINE_SA = "pipeline-runner"
TENANT_SA = "fedfm-client"
ENROLLED = {"fedfm.dev/enrolled": "true"}
FEDFM = str(Path(sys.executable).parent / "fedfm")
LABELS = ["business", "health", "science", "sports"]


class Operator:
    """`python -m fedfm.operators` as a subprocess, under the operator's service account."""

    def __init__(self, kubeconfig: str, workdir: Path):
        self.kubeconfig, self.workdir = kubeconfig, workdir
        self.port = free_ports(1)[0]
        self.process: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        log = open(self.workdir / f"operator-{self.starts}.log", "w")
        env = dict(os.environ, KUBECONFIG=self.kubeconfig)
        self.process = subprocess.Popen([sys.executable, "-m", "fedfm.operators", "--metrics-port", str(self.port)],
                                        env=env, stdout=log, stderr=subprocess.STDOUT)
        wait_for(self.metrics, 60, message=lambda: f"operator did not start:\n{self.log()}",
                 ignore=(OSError,))

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=2) as response:
            return response.read().decode()

    def kill(self) -> None:
        """SIGKILL: no chance to clean up, as when a node dies."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        return (self.workdir / f"operator-{self.starts}.log").read_text()[-6000:]

    def alive(self) -> bool:
        return self.process.poll() is None


@dataclass
class Cluster:
    plane: object
    workdir: Path
    operator: Operator
    prometheus: Prometheus  # scrapes the operator every second
    pipeline_kubeconfig: str
    behaviour: dict  # tenant namespace -> what the kubelet does with its Pods ("run", "ignore", "fail")

    @property
    def custom(self) -> client.CustomObjectsApi:
        return client.CustomObjectsApi(self.plane.admin)

    def get(self, plural: str, namespace: str, name: str) -> dict:
        return self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, plural, name)

    def rounds(self, namespace: str) -> list[dict]:
        return self.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, CLIENT_ROUNDS)["items"]

    def jobs(self, namespace: str) -> list[client.V1Job]:
        return client.BatchV1Api(self.plane.admin).list_namespaced_job(namespace).items


@pytest.fixture(scope="module")
def cluster(control_plane, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("fedfm-cluster")
    for namespace in (PLATFORM, OPERATOR_NAMESPACE):
        control_plane.create_namespace(namespace)
    control_plane.apply_all(rbac.operator_manifests(OPERATOR_NAMESPACE))
    control_plane.apply({"apiVersion": "v1", "kind": "ServiceAccount",
                         "metadata": {"name": PIPELINE_SA, "namespace": PLATFORM}})
    operator = Operator(control_plane.service_account_kubeconfig(
        OPERATOR_NAMESPACE, rbac.OPERATOR_ROLE, workdir / "operator.kubeconfig"), workdir)
    pipeline_kubeconfig = control_plane.service_account_kubeconfig(PLATFORM, PIPELINE_SA,
                                                                   workdir / "pipeline.kubeconfig")
    behaviour: dict[str, str] = {}
    kubelet = FakeKubelet(control_plane.admin, decide=lambda pod: behaviour.get(pod.metadata.namespace, "run"),
                          label_selector=LABEL_CLIENT_ROUND, max_parallel=2, workdir=workdir / "kubelet")
    # Pod commands are `fedfm ...`: the kubelet runs them with this environment, so put our venv first.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    operator.start()
    prometheus = Prometheus(workdir / "prometheus", [f"127.0.0.1:{operator.port}"])
    try:
        with kubelet:
            yield Cluster(control_plane, workdir, operator, prometheus, pipeline_kubeconfig, behaviour)
            operator.stop()
            assert not kubelet.errors, kubelet.errors
    finally:
        prometheus.stop()


@dataclass
class Federation:
    cfg: FederationConfig
    namespaces: dict[str, str]  # client -> tenant namespace
    config_file: Path


def make_federation(cluster: Cluster, tiny_classifier: str, name: str, *, settings: dict | None = None,
                    **policy) -> Federation:
    """A Federation in the platform namespace and three enrolled tenants with data of their own
    (``settings``: dotted config overrides)."""
    plane, workdir = cluster.plane, cluster.workdir / name
    workdir.mkdir()
    clients = ["a", "b", "c"]
    namespaces = {tenant: f"{name}-{tenant}" for tenant in clients}
    rows = load_builtin("topics").head(360)
    for index, tenant in enumerate(clients):
        plane.create_namespace(namespaces[tenant])
        plane.apply_all(rbac.tenant_manifests(namespaces[tenant], TENANT_SA))
        rows.iloc[index::3].to_csv(workdir / f"{tenant}.csv", index=False)
    plane.apply_all(rbac.pipeline_manifests(PLATFORM, PIPELINE_SA, list(namespaces.values())))
    cfg = FederationConfig.parse({
        "name": name,
        "model": {"name_or_path": tiny_classifier, "max_length": 32},
        "data": {"labels": LABELS, "eval_fraction": 0.25},
        "clients": [{"name": tenant, "namespace": namespaces[tenant]} for tenant in clients],
        "rounds": 2,
        "training": {"local_steps": 3, "batch_size": 8, "learning_rate": 5e-3},
        "lora": {"r": 4, "alpha": 8},
        "policy": policy,
        "execution": {"mode": "kubernetes", "storage_uri": f"file://{workdir / 'storage'}",
                      "federation_namespace": PLATFORM, "poll_seconds": 0.5},
    }).with_overrides(settings or {})
    plane.apply({"apiVersion": f"{GROUP}/{VERSION}", "kind": "Federation",
                 "metadata": {"name": name, "namespace": PLATFORM},
                 "spec": {"config": cfg.as_dict(), "clientSelector": {"matchLabels": ENROLLED}}})
    for tenant in clients:
        plane.apply({"apiVersion": f"{GROUP}/{VERSION}", "kind": "FederatedClient",
                     "metadata": {"name": tenant, "namespace": namespaces[tenant], "labels": ENROLLED},
                     "spec": {"federationRef": {"name": name, "namespace": PLATFORM},
                              "data": {"uri": f"file://{workdir / f'{tenant}.csv'}"},
                              "image": "registry.example/fedfm:test", "serviceAccountName": TENANT_SA,
                              "resources": {"cpu": 1, "memory": "2Gi"}}})
    config_file = workdir / "federation.json"
    config_file.write_text(json.dumps(cfg.as_dict()))
    for tenant in clients:
        wait_for(lambda c=tenant: (cluster.get(FEDERATED_CLIENTS, namespaces[c], c).get("status") or {})
                 .get("phase") == "Ready", 30, message=f"tenant {tenant} never became Ready")
    return Federation(cfg, namespaces, config_file)


def fedfm_run(cluster: Cluster, federation: Federation, output: Path, **popen) -> subprocess.Popen:
    """`fedfm run` on the federation's config, as the pipeline's service account."""
    env = dict(os.environ, KUBECONFIG=cluster.pipeline_kubeconfig)
    return subprocess.Popen([FEDFM, "run", "--config", str(federation.config_file), "--output", str(output)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def finish(process: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    output, _ = process.communicate(timeout=timeout)
    return process.returncode, output


def test_two_rounds_on_three_tenants(cluster, tiny_classifier, tmp_path):
    federation = make_federation(cluster, tiny_classifier, "fed-e2e")
    code, output = finish(fedfm_run(cluster, federation, tmp_path / "run"))
    assert code == 0, output + cluster.operator.log()
    history = json.loads((tmp_path / "run" / "metrics.json").read_text())["rounds"]
    assert [record["round"] for record in history] == [0, 1, 2]
    for record in history[1:]:
        assert sorted(record["clients"]) == ["a", "b", "c"] and record["missing"] == {}
        assert sorted(record["eval"]["clients"]) == ["a", "b", "c"] and record["eval_missing"] == {}

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


def test_secure_aggregation_runs_its_steps_as_jobs_in_the_tenants_namespaces(cluster, tiny_classifier, tmp_path):
    """Every protocol step of every client is a ClientRound and a Job in the tenant's namespace; the
    tenants' keys and plain updates stay in their own state locations; the storage the pipeline reads
    holds masked updates only; the round aggregates all three."""
    state = cluster.workdir / "fed-sa-tenant-state"
    federation = make_federation(cluster, tiny_classifier, "fed-sa", settings={
        "rounds": 1, "secure_aggregation.enabled": True, "execution.client_state_uri": f"file://{state}"})
    code, output = finish(fedfm_run(cluster, federation, tmp_path / "run"))
    assert code == 0, output + cluster.operator.log()
    history = json.loads((tmp_path / "run" / "metrics.json").read_text())["rounds"]
    assert sorted(history[1]["clients"]) == ["a", "b", "c"] and history[1]["missing"] == {}
    for tenant, namespace in federation.namespaces.items():
        rounds = cluster.rounds(namespace)
        steps = sorted(r["spec"].get("secureStep", r["spec"]["purpose"]) for r in rounds)
        assert steps == ["Evaluate", "Evaluate", "advertise", "reveal", "share", "train"]
        assert {r["status"]["phase"] for r in rounds} == {"Succeeded"}
        assert all(job.spec.template.spec.service_account_name == TENANT_SA for job in cluster.jobs(namespace))
        assert (state / tenant / "secagg" / "round-0001" / "update.safetensors").exists()
    storage = cluster.workdir / "fed-sa" / "storage"
    masked = sorted(storage.rglob("train.out"))
    assert len(masked) == 3 and not list(storage.rglob("*.update.safetensors"))
    for path in masked:
        with safe_open(str(path), framework="pt") as handle:
            assert handle.metadata()["format"] == "fedfm-masked-update/1"


DEADLINE = 40


def test_deadline_and_quorum(cluster, tiny_classifier, tmp_path):
    """Tenant c's Jobs never run: its rounds end TimedOut; with a quorum of 2 the round aggregates on a
    and b; with a quorum of 3 it fails, and the Federation says why."""
    # a and b must finish inside it while another test worker loads the same 2 cores (20 s was too short)
    at_quorum = make_federation(cluster, tiny_classifier, "fed-quorum", min_clients=2, round_deadline_seconds=DEADLINE)
    cluster.behaviour[at_quorum.namespaces["c"]] = "ignore"
    at_quorum.cfg = at_quorum.cfg.with_overrides({"rounds": 1})
    at_quorum.config_file.write_text(json.dumps(at_quorum.cfg.as_dict()))
    code, output = finish(fedfm_run(cluster, at_quorum, tmp_path / "quorum"))
    assert code == 0, output + cluster.operator.log()
    record = json.loads((tmp_path / "quorum" / "metrics.json").read_text())["rounds"][1]
    assert sorted(record["clients"]) == ["a", "b"]
    assert record["missing"]["c"].startswith(f"TimedOut: no result within the {DEADLINE} s deadline")
    trained = [r for r in cluster.rounds(at_quorum.namespaces["c"]) if r["spec"]["purpose"] == "Train"]
    assert [r["status"]["phase"] for r in trained] == ["TimedOut"]
    # stopped: by the job controller (the Job carries the deadline) or deleted by the operator
    stopped = cluster.jobs(at_quorum.namespaces["c"])
    assert all(job.metadata.deletion_timestamp or not job.status.active for job in stopped)

    below = make_federation(cluster, tiny_classifier, "fed-below", min_clients=3, round_deadline_seconds=DEADLINE)
    cluster.behaviour[below.namespaces["c"]] = "ignore"
    below.cfg = below.cfg.with_overrides({"rounds": 1})
    below.config_file.write_text(json.dumps(below.cfg.as_dict()))
    code, output = finish(fedfm_run(cluster, below, tmp_path / "below"))
    assert code == 2
    assert "step aggregate (round 1) failed: QuorumError: round 1: 2 of 3 clients sent an update, below the " \
           "quorum of 3" in " ".join(output.split())
    wait_for(lambda: {c["type"]: c for c in cluster.get(FEDERATIONS, PLATFORM, "fed-below")["status"]["conditions"]}
             .get("RoundFailed", {}).get("status") == "True", 15, message="no RoundFailed condition")
    status = cluster.get(FEDERATIONS, PLATFORM, "fed-below")["status"]
    failed = {c["type"]: c for c in status["conditions"]}["RoundFailed"]
    assert failed["reason"] == "BelowQuorum" and "c: TimedOut" in failed["message"]
    assert status["phase"] == "Failed" and "lastAggregate" not in status


def test_below_the_quorum_a_fresh_tenant_trains_in_its_own_namespace(cluster, tiny_classifier, tmp_path):
    """policy.below_quorum retry: 2 of the 3 tenants are drawn, and one of them never runs its Job; at its
    deadline the aggregate step draws the third tenant, whose fine-tune runs as a Job in its own namespace,
    and the round aggregates on 2."""
    retry = make_federation(cluster, tiny_classifier, "fed-retry", min_clients=2, round_deadline_seconds=20,
                            sample_fraction=0.6, below_quorum="retry")
    retry.cfg = retry.cfg.with_overrides({"rounds": 1})
    retry.config_file.write_text(json.dumps(retry.cfg.as_dict()))
    drawn = retry.cfg.sampled_clients(1)
    dead, fresh = drawn[0], retry.cfg.fresh_clients(1, 2, 1, exclude=drawn)
    assert len(drawn) == 2 and len(fresh) == 1
    cluster.behaviour[retry.namespaces[dead]] = "ignore"
    code, output = finish(fedfm_run(cluster, retry, tmp_path / "retry"))
    assert code == 0, output + cluster.operator.log()
    record = json.loads((tmp_path / "retry" / "metrics.json").read_text())["rounds"][1]
    assert sorted(record["clients"]) == sorted({*drawn, *fresh} - {dead})
    assert record["missing"][dead].startswith("TimedOut: no result within the 20 s deadline")
    trained = [r for r in cluster.rounds(retry.namespaces[fresh[0]]) if r["spec"]["purpose"] == "Train"]
    assert [r["status"]["phase"] for r in trained] == ["Succeeded"]


def _answer_with_nan(cluster: Cluster, namespace: str, stop: threading.Event) -> None:
    """Play tenant b's node: for each of its training Pods, write a well-formed update with a NaN in it
    (right keys, shapes and base model) and report the Pod Succeeded; run evaluations honestly."""
    core = client.CoreV1Api(cluster.plane.admin)
    done: set[str] = set()
    while not stop.is_set():
        for pod in core.list_namespaced_pod(namespace).items:
            if pod.metadata.name in done or (pod.status.phase or "Pending") != "Pending":
                continue
            command = pod.spec.containers[0].command
            arguments = dict(zip(command[2::2], command[3::2]))
            if command[1] == "client-train":
                start = load_adapter(arguments["--global-adapter"])
                tensors = {key: torch.zeros_like(value) for key, value in start.tensors.items()}
                next(iter(tensors.values())).view(-1)[0] = float("nan")
                save_adapter(arguments["--output"], tensors, AdapterMeta(
                    kind="update", base_model=start.meta.base_model, peft_config=start.meta.peft_config,
                    round=int(arguments["--round"]), samples=90, client=arguments["--client"],
                    metrics={"train_loss": 1.0, "seconds": 1.0}))
                exit_code = 0
            else:
                env = dict(os.environ, **{e.name: e.value for e in pod.spec.containers[0].env})
                exit_code = subprocess.run(command, env=env, capture_output=True).returncode
            now = now_rfc3339()
            core.patch_namespaced_pod_status(pod.metadata.name, namespace, {"status": {
                "phase": "Succeeded" if exit_code == 0 else "Failed", "startTime": now,
                "containerStatuses": [{"name": "fedfm", "ready": False, "restartCount": 0, "image": "fedfm",
                                       "imageID": "", "state": {"terminated": {
                                           "exitCode": exit_code, "reason": "Completed" if exit_code == 0 else "Error",
                                           "startedAt": now, "finishedAt": now}}}]}})
            done.add(pod.metadata.name)
        stop.wait(0.5)


def test_a_nan_update_quarantines_the_client_and_the_round_goes_on_without_it(cluster, tiny_classifier, tmp_path):
    federation = make_federation(cluster, tiny_classifier, "fed-nan", min_clients=2)
    federation.cfg = federation.cfg.with_overrides({"rounds": 1})
    federation.config_file.write_text(json.dumps(federation.cfg.as_dict()))
    cluster.behaviour[federation.namespaces["b"]] = "ignore"
    stop = threading.Event()
    tenant_b = threading.Thread(target=_answer_with_nan, args=(cluster, federation.namespaces["b"], stop), daemon=True)
    tenant_b.start()
    try:
        code, output = finish(fedfm_run(cluster, federation, tmp_path / "run"))
    finally:
        stop.set()
        tenant_b.join()
    assert code == 0, output + cluster.operator.log()
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())["rounds"][1]
    assert sorted(record["clients"]) == ["a", "c"]  # the aggregate excludes b
    assert record["missing"]["b"].startswith("Failed: client b's tensor") and "non-finite" in record["missing"]["b"]
    trained = [r for r in cluster.rounds(federation.namespaces["b"]) if r["spec"]["purpose"] == "Train"][0]
    assert trained["status"]["phase"] == "Failed" and trained["status"]["reason"] == "InvalidUpdate"
    wait_for(lambda: cluster.get(FEDERATED_CLIENTS, federation.namespaces["b"], "b")["status"]["phase"]
             == "Quarantined", 15, message="client b was not quarantined")
    quarantined = cluster.get(FEDERATED_CLIENTS, federation.namespaces["b"], "b")["status"]
    assert "round 1" in quarantined["reason"] and "non-finite value" in quarantined["reason"]
    events = client.CoreV1Api(cluster.plane.admin).list_namespaced_event(federation.namespaces["b"]).items
    assert any(e.reason == "InvalidUpdate" and e.type == "Warning" for e in events)


def test_an_operator_restart_mid_round_finishes_the_round_without_duplicate_jobs(cluster, tiny_classifier, tmp_path):
    federation = make_federation(cluster, tiny_classifier, "fed-restart")
    federation.cfg = federation.cfg.with_overrides({"rounds": 1})
    federation.config_file.write_text(json.dumps(federation.cfg.as_dict()))
    run = fedfm_run(cluster, federation, tmp_path / "run")
    namespace = federation.namespaces["a"]
    wait_for(lambda: any(job.metadata.name.endswith("-train-a") for job in cluster.jobs(namespace)), 180,
             message="no training Job for client a")
    before = {job.metadata.name: job.metadata.uid for job in cluster.jobs(namespace)}
    cluster.operator.kill()
    time.sleep(6)  # rounds go on without it: Pods finish, the pipeline creates more ClientRounds
    cluster.operator.start()
    code, output = finish(run)
    assert code == 0, output + cluster.operator.log()
    for namespace in federation.namespaces.values():
        rounds = cluster.rounds(namespace)
        jobs = cluster.jobs(namespace)
        assert {r["status"]["phase"] for r in rounds} == {"Succeeded"}
        assert sorted(job.metadata.name for job in jobs) == sorted(r["metadata"]["name"] for r in rounds)
    after = {job.metadata.name: job.metadata.uid for job in cluster.jobs(federation.namespaces["a"])}
    assert all(after[name] == uid for name, uid in before.items())  # the same Jobs, not recreated


def _status(api: client.ApiClient, call) -> int:
    try:
        call()
        return 200
    except ApiException as exc:
        return exc.status


def test_tenants_and_the_pipeline_see_only_what_they_may(cluster, tiny_classifier):
    federation = make_federation(cluster, tiny_classifier, "fed-rbac")
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


def test_bad_objects_are_refused_or_reported_never_a_crash_loop(cluster, tiny_classifier):
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
    assert cluster.operator.alive()
    assert not client.BatchV1Api(plane.admin).list_namespaced_job("fed-bad-tenant").items
