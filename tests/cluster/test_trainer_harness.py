"""The Kubeflow Trainer harness (trainer_harness.py) on the real node: Trainer's CRDs, stripped for v1.20, take
the TrainJobs FedFM writes; the played controller runs a 2-node gloo all-reduce across two Pods of the
vendored ``torch-distributed`` runtime, with the runtime patches and the torch plugin's environment, and follows
failures, deadlines, restarts and deletions as Trainer would.

Every TrainJob is created at once (module fixture) so that their Pods run side by side."""

from __future__ import annotations

import json
import textwrap
import time
import uuid

import pytest
from kubernetes import client

from kube import crd_established, resource_for, service_account_token, wait_for
from trainer_harness import (API_VERSION, TRAINJOB_NAME, TrainerController, finished, node_pod, trainer_crds,
                             vendored_runtime)

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

SA = "fedfm-client"
ALLREDUCE = textwrap.dedent('''
    import datetime, json, os, torch, torch.distributed as dist
    env = {k: v for k, v in os.environ.items() if k.startswith(("PET_", "FEDFM_"))}
    rank, world = int(os.environ["PET_NODE_RANK"]), int(os.environ["PET_NNODES"])
    master = f"tcp://{os.environ['PET_MASTER_ADDR']}:{os.environ['PET_MASTER_PORT']}"
    dist.init_process_group("gloo", init_method=master, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    value = torch.tensor([float(rank + 1)])
    dist.all_reduce(value)
    dist.destroy_process_group()
    print("RESULT " + json.dumps({"rank": rank, "sum": value.item(), "env": env, "uid": os.getuid()}))
''')


def _patch(labels: dict | None = None, env: dict | None = None, grace: int | None = None) -> dict:
    """A runtime patch as the operator writes one: the tenant's ServiceAccount, a scratch volume, hardening."""
    pod_spec = {
        "serviceAccountName": SA,
        "volumes": [{"name": "scratch", "emptyDir": {}}],
        "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "fedfm.dev/tenant", "operator": "Exists", "effect": "NoSchedule"}],
        "containers": [{"name": "node",
                        "env": [{"name": k, "value": v} for k, v in (env or {}).items()],
                        "volumeMounts": [{"name": "scratch", "mountPath": "/tmp"}],
                        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                            "capabilities": {"drop": ["ALL"]}}}],
        **({"terminationGracePeriodSeconds": grace} if grace is not None else {}),
    }
    return {"manager": "fedfm.dev/operator", "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [
        {"name": "node", "template": {"spec": {"template": {"metadata": {"labels": labels or {}},
                                                            "spec": pod_spec}}}}]}}}}


def _trainjob(name: str, command: list[str], image: str, nodes: int | None = 2, deadline: int | None = 300,
              runtime: dict | None = None, env: dict | None = None, patch: dict | None = None) -> dict:
    trainer = {"image": image, "command": command,
               "env": [{"name": "OMP_NUM_THREADS", "value": "1"}, *({"name": k, "value": v}
                                                                    for k, v in (env or {}).items())],
               "numProcPerNode": 1,
               "resourcesPerNode": {"requests": {"cpu": "50m", "memory": "128Mi"}, "limits": {"memory": "2Gi"}}}
    if nodes is not None:
        trainer["numNodes"] = nodes
    spec = {"runtimeRef": runtime or {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime",
                                      "name": "torch-distributed"},
            "trainer": trainer, "runtimePatches": [patch or _patch()]}
    if deadline is not None:
        spec["activeDeadlineSeconds"] = deadline
    return {"apiVersion": API_VERSION, "kind": "TrainJob", "metadata": {"name": name}, "spec": spec}


@pytest.fixture(scope="module")
def jobs(node, trainer):
    """A tenant-like namespace (ServiceAccount with its token), the vendored torch-distributed runtime, a
    namespaced TrainingRuntime, and every TrainJob of this file, created at once."""
    trainer.install()
    namespace = f"trainer-{uuid.uuid4().hex[:5]}"
    node.create_namespace(namespace)
    core = client.CoreV1Api(node.admin)
    core.create_namespaced_service_account(namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name=SA)))
    service_account_token(node.admin, namespace, SA)  # v1.20 admits Pods once the token exists
    node.apply(vendored_runtime("torch-distributed"))
    local = vendored_runtime("torch-distributed")
    local["kind"], local["metadata"] = "TrainingRuntime", {"name": "tenant-torch", "namespace": namespace}
    node.apply(local)
    image = node.images["fedfm"]
    late = f"late-{namespace}"   # a ClusterTrainingRuntime that a test creates only later
    manifests = {
        "allreduce": _trainjob("allreduce", ["python", "-c", ALLREDUCE], image,
                               env={"FEDFM_LAYER": "trainer"},
                               patch=_patch(labels={"fedfm.dev/client": "a"},
                                            env={"FEDFM_PATCHED": "yes", "FEDFM_LAYER": "patch"})),
        "crash": _trainjob("crash", ["sh", "-c", '[ "$PET_NODE_RANK" = 1 ] && exit 1; exec sleep 600'], image),
        "slow": _trainjob("slow", ["sleep", "600"], image, nodes=1, deadline=3),
        "missing": _trainjob("missing", ["true"], image, nodes=1, runtime={"name": late}),
        "local": _trainjob("local", ["sh", "-c", "echo NODE $PET_NNODES $PET_NODE_RANK $PET_MASTER_ADDR"], image,
                           nodes=None, runtime={"kind": "TrainingRuntime", "name": "tenant-torch"}),
        "adopt": _trainjob("adopt", ["sleep", "600"], image, patch=_patch(grace=1)),
        "paused": _trainjob("paused", ["true"], image, nodes=1),
    }
    manifests["paused"]["spec"]["suspend"] = True
    for manifest in manifests.values():
        node.apply(manifest, namespace)
    yield {"namespace": namespace, "manifests": manifests, "late": late,
           "trainjobs": resource_for(node.admin, API_VERSION, "TrainJob")}
    core.delete_namespace(namespace)
    node.delete({"apiVersion": API_VERSION, "kind": "ClusterTrainingRuntime", "metadata": {"name": late}})


def _get(jobs, name: str) -> dict:
    return jobs["trainjobs"].get(name=name, namespace=jobs["namespace"]).to_dict()


def _outcome(node, jobs, name: str, timeout: float = 90, terminal: bool = True) -> dict:
    """The TrainJob's Complete/Failed condition, once it has one (``terminal``: not a transient Failed)."""
    def done():
        tj = _get(jobs, name)
        kind = finished(tj, terminal)
        return kind and next(c for c in tj["status"]["conditions"] if c["type"] == kind)
    return wait_for(done, timeout, 0.5, lambda: f"TrainJob {name} never finished: {_get(jobs, name).get('status')};"
                                                f" kubelet log:\n{node.log_tail()}")


def _pods(node, jobs, name: str) -> list:
    return client.CoreV1Api(node.admin).list_namespaced_pod(
        jobs["namespace"], label_selector=f"{TRAINJOB_NAME}={name}").items


def test_a_node_pod_layers_runtime_patches_and_trainer_as_trainer_does():
    """No cluster needed: the Pod manifest of node_pod for a runtime with its own env, volumes and gates."""
    runtime = vendored_runtime("torch-distributed")
    runtime["spec"]["mlPolicy"] = {"numNodes": 3, "torch": {"numProcPerNode": "auto"}}
    pod_spec = runtime["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    pod_spec["volumes"] = [{"name": "scratch", "emptyDir": {"medium": "Memory"}}, {"name": "keep", "emptyDir": {}}]
    pod_spec["schedulingGates"] = [{"name": "later"}]
    pod_spec["containers"][0]["env"] = [{"name": "FROM", "value": "runtime"}, {"name": "KEEP", "value": "1"}]
    pod_spec["containers"][0]["volumeMounts"] = [{"name": "keep", "mountPath": "/tmp"}]
    trainjob = _trainjob("tj", ["python"], "img:1", nodes=None, patch=_patch(env={"FROM": "patch"}),
                         env={"PET_NNODES": "99"})
    trainjob["metadata"].update(namespace="ns", uid="uid-1")
    del trainjob["spec"]["trainer"]["numProcPerNode"]
    trainjob["spec"]["trainer"]["resourcesPerNode"] = {"limits": {"nvidia.com/gpu": "4"}}
    pod = node_pod(trainjob, runtime, 2, "10.244.0.7")
    assert pod["metadata"]["name"] == "tj-node-0-2"
    assert pod["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    spec = pod["spec"]
    assert "schedulingGates" not in spec and spec["restartPolicy"] == "Never"
    assert spec["volumes"] == [{"name": "scratch", "emptyDir": {"medium": "Memory"}},  # merged by name, deeply
                               {"name": "keep", "emptyDir": {}}]
    [container] = spec["containers"]
    assert container["image"] == "img:1" and container["command"] == ["python"]
    assert container["volumeMounts"] == [{"name": "scratch", "mountPath": "/tmp"}]   # merged by mountPath
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["FROM"] == "patch" and env["KEEP"] == "1" and env["OMP_NUM_THREADS"] == "1"
    assert (env["PET_NNODES"], env["PET_NPROC_PER_NODE"], env["PET_NODE_RANK"]) == ("3", "4", "2")
    assert (env["PET_MASTER_ADDR"], env["PET_MASTER_PORT"], env["JOB_COMPLETION_INDEX"]) == (
        "10.244.0.7", "29400", "2")
    master = node_pod(trainjob, runtime, 0, None)["spec"]["containers"][0]["env"]
    assert {"name": "PET_MASTER_ADDR", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}} in master


def test_trainer_crds_are_established_on_v120_and_keep_every_field_fedfm_writes(node, jobs):
    names = [crd["metadata"]["name"] for crd in trainer_crds()]
    assert sorted(names) == ["clustertrainingruntimes.trainer.kubeflow.org", "trainingruntimes.trainer.kubeflow.org",
                             "trainjobs.trainer.kubeflow.org"]
    assert all(crd_established(node.admin, name) for name in names)
    assert "x-kubernetes-validations" not in json.dumps(trainer_crds())
    stored = _get(jobs, "allreduce")["spec"]
    sent = jobs["manifests"]["allreduce"]["spec"]
    # nothing pruned by the structural schema: runtimeRef, trainer, runtimePatches, deadline as sent
    assert stored["trainer"] == sent["trainer"]
    assert stored["runtimePatches"] == sent["runtimePatches"]
    assert stored["activeDeadlineSeconds"] == 300
    assert stored["runtimeRef"] == sent["runtimeRef"]
    assert _get(jobs, "missing")["spec"]["runtimeRef"] == {  # the CRD's defaults
        "apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime", "name": jobs["late"]}


def test_two_node_pods_all_reduce_over_gloo_with_the_torch_plugins_environment(node, jobs, trainer):
    outcome = _outcome(node, jobs, "allreduce")
    pods = sorted(_pods(node, jobs, "allreduce"), key=lambda p: p.metadata.name)
    logs = {p.metadata.name: node.pod_logs(jobs["namespace"], p.metadata.name) for p in pods}
    assert outcome["type"] == "Complete", (outcome, logs)
    assert [p.metadata.name for p in pods] == ["allreduce-node-0-0", "allreduce-node-0-1"]
    results = [json.loads(next(line for line in logs[p.metadata.name].splitlines()
                               if line.startswith("RESULT "))[len("RESULT "):]) for p in pods]
    master_ip = pods[0].status.pod_ip
    for rank, (pod, result) in enumerate(zip(pods, results)):
        assert result["rank"] == rank and result["sum"] == 3.0   # 1 + 2, across the bridge
        assert result["env"] == {"PET_NNODES": "2", "PET_NPROC_PER_NODE": "1", "PET_NODE_RANK": str(rank),
                                 "PET_MASTER_ADDR": master_ip, "PET_MASTER_PORT": "29400",
                                 "FEDFM_PATCHED": "yes", "FEDFM_LAYER": "trainer"}  # the TrainJob's env wins
        assert result["uid"] == 10001
        assert pod.metadata.labels["fedfm.dev/client"] == "a"
        assert pod.metadata.labels["trainer.kubeflow.org/trainjob-name"] == "allreduce"
        owner = pod.metadata.owner_references[0]
        assert (owner.kind, owner.name, owner.controller) == ("TrainJob", "allreduce", True)
        spec = pod.spec
        assert spec.service_account_name == SA and spec.restart_policy == "Never"
        assert spec.node_selector == {"kubernetes.io/os": "linux"}
        assert any(t.key == "fedfm.dev/tenant" for t in spec.tolerations)
        assert spec.security_context.run_as_non_root and spec.security_context.run_as_user == 10001
        container = spec.containers[0]
        assert container.name == "node" and container.image == node.images["fedfm"]
        assert container.security_context.read_only_root_filesystem
        assert [m.mount_path for m in container.volume_mounts if m.name == "scratch"] == ["/tmp"]
        assert container.resources.limits == {"memory": "2Gi"}
        assert container.resources.requests == {"cpu": "50m", "memory": "128Mi"}
    status = _get(jobs, "allreduce")["status"]
    assert status["jobsStatus"] == [{"name": "node", "active": 0, "ready": 0, "succeeded": 2, "failed": 0,
                                     "suspended": 0}]
    assert outcome["reason"] and outcome["lastTransitionTime"]


def test_a_namespaced_runtime_gives_its_node_count_and_node_zero_its_own_ip(node, jobs):
    assert _outcome(node, jobs, "local")["type"] == "Complete"
    [pod] = _pods(node, jobs, "local")
    assert node.pod_logs(jobs["namespace"], pod.metadata.name).split() == ["NODE", "1", "0", pod.status.pod_ip]


def test_a_missing_runtime_fails_the_trainjob_without_pods_until_it_comes(node, jobs):
    outcome = _outcome(node, jobs, "missing", timeout=20, terminal=False)
    assert (outcome["type"], outcome["reason"]) == ("Failed", "TrainingRuntimeNotFound")
    assert jobs["late"] in outcome["message"]
    assert not _pods(node, jobs, "missing")
    assert not finished(_get(jobs, "missing"), terminal=True)   # transient: the runtime may still come
    late = vendored_runtime("torch-distributed")
    late["metadata"] = {"name": jobs["late"]}
    node.apply(late)
    assert _outcome(node, jobs, "missing")["type"] == "Complete"


def test_a_failed_node_fails_the_trainjob_and_stops_the_others(node, jobs):
    outcome = _outcome(node, jobs, "crash")
    assert (outcome["type"], outcome["reason"]) == ("Failed", "FailedJobs")
    assert "crash-node-0-1" in outcome["message"] and "exited with code 1" in outcome["message"]
    wait_for(lambda: [p.metadata.name for p in _pods(node, jobs, "crash")] == ["crash-node-0-1"], 30,
             message="node 0 of the failed TrainJob was not deleted")
    assert _get(jobs, "crash")["status"]["jobsStatus"] == [{"name": "node", "active": 0, "ready": 0, "succeeded": 0,
                                                            "failed": 1, "suspended": 0}]


def test_the_deadline_fails_the_trainjob_and_deletes_its_pods(node, jobs):
    outcome = _outcome(node, jobs, "slow", timeout=30)
    assert (outcome["type"], outcome["reason"]) == ("Failed", "DeadlineExceeded")
    assert _get(jobs, "slow")["status"]["jobsStatus"][0]["active"] == 0
    wait_for(lambda: not _pods(node, jobs, "slow"), 30, message="the pods outlived the deadline")


def test_a_suspended_trainjob_runs_once_resumed(node, jobs):
    def suspended():
        condition = next((c for c in (_get(jobs, "paused").get("status") or {}).get("conditions") or []
                          if c["type"] == "Suspended"), None)
        return condition and condition["status"] == "True"

    wait_for(suspended, 20, 0.5, "paused never got its Suspended condition")
    assert not _pods(node, jobs, "paused")
    jobs["trainjobs"].patch(name="paused", namespace=jobs["namespace"], body={"spec": {"suspend": False}},
                            content_type="application/merge-patch+json")
    assert _outcome(node, jobs, "paused")["type"] == "Complete"
    conditions = {c["type"]: c for c in _get(jobs, "paused")["status"]["conditions"]}
    assert (conditions["Suspended"]["status"], conditions["Suspended"]["reason"]) == ("False", "Resumed")


def test_a_restarted_controller_adopts_the_pods_and_the_garbage_collector_deletes_them(node, jobs, trainer):
    namespace = jobs["namespace"]
    wait_for(lambda: len(_pods(node, jobs, "adopt")) == 2, 60, message="adopt never got its 2 pods")
    before = {p.metadata.name: p.metadata.uid for p in _pods(node, jobs, "adopt")}
    trainer.stop()
    try:
        fresh = TrainerController(node, namespaces=[namespace]).start()
        time.sleep(2)   # 4 passes
        fresh.stop()
    finally:
        trainer.start()
    assert {p.metadata.name: p.metadata.uid for p in _pods(node, jobs, "adopt")} == before
    assert not finished(_get(jobs, "adopt"))
    assert not fresh.errors, fresh.errors
    jobs["trainjobs"].delete(name="adopt", namespace=namespace)
    # The garbage collector watches TrainJobs from its first discovery after the CRDs came (every 30 s).
    wait_for(lambda: all(p.metadata.deletion_timestamp for p in _pods(node, jobs, "adopt")), 60, 0.5,
             "the garbage collector never deleted adopt's pods")
