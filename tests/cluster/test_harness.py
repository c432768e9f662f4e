"""Tests of the cluster test harness itself: the control plane, RBAC, the fake kubelet with the real Job
controller, and the real garbage collector."""

from __future__ import annotations

import sys
import time
import uuid

import pytest
from kube import FakeKubelet, api_client_from_kubeconfig, apply, crd_established, wait_for
from kubernetes import client
from kubernetes.client.rest import ApiException

pytestmark = pytest.mark.cluster


def _job(name: str, namespace: str, command: list[str], **container: object) -> dict:
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"backoffLimit": 0, "template": {
            "metadata": {"labels": {"harness-run": namespace}},
            "spec": {"restartPolicy": "Never",
                     "containers": [{"name": "main", "image": "python:3.11", "command": command, **container}]}}},
    }


def _pod(name: str, namespace: str, command: list[str]) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": namespace},
            "spec": {"restartPolicy": "Never",
                     "containers": [{"name": "main", "image": "python:3.11", "command": command}]}}


def _job_pods(core: client.CoreV1Api, namespace: str, job: str) -> list[client.V1Pod]:
    return core.list_namespaced_pod(namespace, label_selector=f"job-name={job}").items


def test_apiserver_answers(control_plane):
    api = control_plane.api_client()
    version = client.VersionApi(api).get_code()
    assert version.git_version.startswith("v1.20")
    names = {ns.metadata.name for ns in client.CoreV1Api(api).list_namespace().items}
    assert {"default", "kube-system"} <= names
    assert "harnesswidgets.harness.fedfm.test" in control_plane.crds
    for crd in control_plane.crds:
        assert crd_established(api, crd)
    # alice authenticates but has no rights
    with pytest.raises(ApiException) as denied:
        client.CoreV1Api(control_plane.api_client("alice")).list_namespaced_config_map("default")
    assert denied.value.status == 403


def test_service_account_kubeconfig_is_subject_to_rbac(control_plane, tmp_path):
    home, other = f"sa-home-{uuid.uuid4().hex[:5]}", f"sa-other-{uuid.uuid4().hex[:5]}"
    control_plane.create_namespace(other, labels={"purpose": "rbac-test"})
    control_plane.create_namespace(other, labels={"purpose": "rbac-test"})   # idempotent
    path = control_plane.service_account_kubeconfig(home, "robot", tmp_path / "robot.kubeconfig")
    # twice: same ServiceAccount, kubeconfig rewritten
    assert control_plane.service_account_kubeconfig(home, "robot", tmp_path / "robot.kubeconfig") == path
    core = client.CoreV1Api(api_client_from_kubeconfig(path))

    with pytest.raises(ApiException) as denied:
        core.list_namespaced_secret(other)
    assert denied.value.status == 403
    assert f"system:serviceaccount:{home}:robot" in denied.value.body

    control_plane.apply_all([
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": {"name": "read-secrets", "namespace": other},
         "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": "robot-reads-secrets", "namespace": other},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "read-secrets"},
         "subjects": [{"kind": "ServiceAccount", "name": "robot", "namespace": home}]},
    ])

    def allowed():
        try:
            core.list_namespaced_secret(other)
            return True
        except ApiException as exc:
            if exc.status == 403:
                return False
            raise
    wait_for(allowed, 10, message="RoleBinding grants the ServiceAccount list on secrets")
    with pytest.raises(ApiException) as still_denied:   # nothing beyond what was granted
        core.list_namespaced_config_map(other)
    assert still_denied.value.status == 403


def test_apply_creates_and_replaces_any_kind(control_plane, namespace):
    api = control_plane.admin
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}, "stringData": {"k": "one"}}
    apply(api, secret, namespace=namespace)
    apply(api, {**secret, "stringData": {"k": "two"}}, namespace=namespace)
    live = client.CoreV1Api(api).read_namespaced_secret("s", namespace)
    assert live.data == {"k": "dHdv"}   # base64 "two"

    widget = {"apiVersion": "harness.fedfm.test/v1", "kind": "HarnessWidget",
              "metadata": {"name": "w", "namespace": namespace}, "spec": {"size": 1}}
    first = control_plane.apply(widget)
    second = control_plane.apply({**widget, "spec": {"size": 2}})
    assert second["spec"] == {"size": 2} and second["metadata"]["uid"] == first["metadata"]["uid"]

    # a CRD applied now, and at once an object of it (cluster-scoped), through the same (cached) client
    gadgets = {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
               "metadata": {"name": "gadgets.harness.fedfm.test"},
               "spec": {"group": "harness.fedfm.test", "scope": "Cluster",
                        "names": {"plural": "gadgets", "singular": "gadget", "kind": "Gadget"},
                        "versions": [{"name": "v1alpha1", "served": True, "storage": True, "schema": {
                            "openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}}]}}
    control_plane.apply(gadgets)
    try:
        gadget = {"apiVersion": "harness.fedfm.test/v1alpha1", "kind": "Gadget", "metadata": {"name": "g"},
                  "spec": {"n": 1}}
        assert control_plane.apply(gadget, namespace=namespace)["metadata"].get("namespace") is None
        assert control_plane.apply({**gadget, "spec": {"n": 2}})["spec"] == {"n": 2}
    finally:
        control_plane.delete(gadgets)

    cluster_role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
                    "metadata": {"name": f"harness-{namespace}"}, "rules": []}
    control_plane.apply(cluster_role)
    control_plane.apply(cluster_role)
    assert control_plane.delete(cluster_role) is True
    assert control_plane.delete(cluster_role) is False


def test_job_succeeds_through_fake_kubelet(control_plane, namespace):
    core, batch = client.CoreV1Api(control_plane.admin), client.BatchV1Api(control_plane.admin)
    control_plane.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds", "namespace": namespace},
                         "stringData": {"token": "s3cret", "user": "bob"}})
    script = ("import os; print('hi'); "
              "print(os.environ['TOKEN'], os.environ['CREDS_user'], os.environ['PLAIN'], os.environ['POD'], "
              "bool(os.environ.get('PATH')))")
    control_plane.apply(_job("hello", namespace, [sys.executable, "-c", script], env=[
        {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
        {"name": "PLAIN", "value": "plain-$(TOKEN)"},
        {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
    ], envFrom=[{"secretRef": {"name": "creds"}, "prefix": "CREDS_"}]))

    # cluster-wide, filtered by a label selector only
    with FakeKubelet(control_plane.api_client(), label_selector=f"harness-run={namespace}") as kubelet:
        job = wait_for(lambda: (j := batch.read_namespaced_job_status("hello", namespace)).status.succeeded == 1 and j,
                       30, message=lambda: f"Job succeeded; kubelet errors: {kubelet.errors}")
    assert job.status.succeeded == 1
    assert any(c.type == "Complete" and c.status == "True" for c in job.status.conditions)

    [pod] = _job_pods(core, namespace, "hello")
    assert kubelet.handled == {pod.metadata.name: "run"}
    assert kubelet.exit_codes == {pod.metadata.name: 0}
    assert pod.status.phase == "Succeeded" and pod.status.start_time is not None
    terminated = pod.status.container_statuses[0].state.terminated
    assert (terminated.exit_code, terminated.reason) == (0, "Completed")
    assert terminated.started_at is not None and terminated.finished_at is not None
    output = open(kubelet.logs[pod.metadata.name]).read().split("\n")
    assert output[:2] == ["hi", f"s3cret bob plain-s3cret {pod.metadata.name} True"]
    assert not kubelet.errors


def test_job_fails_through_fake_kubelet(control_plane, namespace):
    core, batch = client.CoreV1Api(control_plane.admin), client.BatchV1Api(control_plane.admin)
    control_plane.apply(_job("boom", namespace, [sys.executable, "-c", "import sys; print('bad'); sys.exit(3)"]))
    with control_plane.fake_kubelet(namespace=namespace) as kubelet:
        job = wait_for(lambda: (j := batch.read_namespaced_job_status("boom", namespace)).status.failed and j,
                       30, message=lambda: f"Job failed; kubelet errors: {kubelet.errors}")
    assert job.status.failed >= 1 and not job.status.succeeded
    wait_for(lambda: any(c.type == "Failed" and c.status == "True"
                         for c in batch.read_namespaced_job_status("boom", namespace).status.conditions or []),
             15, message="Job condition Failed (backoffLimit 0)")
    [pod] = _job_pods(core, namespace, "boom")
    terminated = pod.status.container_statuses[0].state.terminated
    assert (pod.status.phase, terminated.exit_code, terminated.reason) == ("Failed", 3, "Error")
    assert kubelet.exit_codes[pod.metadata.name] == 3
    assert "bad" in open(kubelet.logs[pod.metadata.name]).read()


def test_ignore_leaves_pod_pending_and_fail_fails_without_running(control_plane, namespace):
    core = client.CoreV1Api(control_plane.admin)
    decide = {"idle": "ignore", "doomed": "fail"}
    with control_plane.fake_kubelet(lambda pod: decide[pod.metadata.name], namespace=namespace) as kubelet:
        for name in decide:
            control_plane.apply(_pod(name, namespace, [sys.executable, "-c", "raise SystemExit(0)"]))
        wait_for(lambda: core.read_namespaced_pod("doomed", namespace).status.phase == "Failed", 15,
                 message="the 'fail' Pod Failed")
        wait_for(lambda: kubelet.handled.get("idle") == "ignore", 10, message="the 'ignore' Pod decided on")
        time.sleep(1.0)
    assert core.read_namespaced_pod("idle", namespace).status.phase == "Pending"
    assert kubelet.handled == {"idle": "ignore", "doomed": "fail"}
    assert kubelet.logs == {} and kubelet.exit_codes == {}
    doomed = core.read_namespaced_pod("doomed", namespace)
    assert doomed.status.container_statuses[0].state.terminated.exit_code == 1


def test_fake_kubelet_survives_deleted_pods_and_respects_selector_and_parallelism(control_plane, namespace):
    core = client.CoreV1Api(control_plane.admin)
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    with control_plane.fake_kubelet(namespace=namespace, label_selector="run=yes", max_parallel=1) as kubelet:
        for name in ("first", "second", "skipped"):
            pod = _pod(name, namespace, sleeper)
            if name != "skipped":
                pod["metadata"]["labels"] = {"run": "yes"}
            control_plane.apply(pod)
        wait_for(lambda: core.read_namespaced_pod("first", namespace).status.phase == "Running", 15,
                 message="first Pod Running")
        time.sleep(0.5)
        assert core.read_namespaced_pod("second", namespace).status.phase == "Pending"   # max_parallel=1
        core.delete_namespaced_pod("first", namespace, grace_period_seconds=0)
        wait_for(lambda: "first" in kubelet.exit_codes, 10, message="the deleted Pod's process killed")
        assert kubelet.exit_codes["first"] is None
        wait_for(lambda: core.read_namespaced_pod("second", namespace).status.phase == "Running", 15,
                 message="second Pod Running after the first was deleted")
        control_plane.apply({**_pod("quick", namespace, [sys.executable, "-c", "print('ok')"]),
                             "metadata": {"name": "quick", "namespace": namespace, "labels": {"run": "yes"}}})
        core.delete_namespaced_pod("second", namespace, grace_period_seconds=0)
        wait_for(lambda: core.read_namespaced_pod("quick", namespace).status.phase == "Succeeded", 15,
                 message=lambda: f"a later Pod still runs; errors: {kubelet.errors}")
    assert "skipped" not in kubelet.handled
    assert core.read_namespaced_pod("skipped", namespace).status.phase == "Pending"
    assert not kubelet.errors


class _GoneStream:
    """A watch response whose only event is ERROR 410 (the apiserver's "too old resource version")."""

    def stream(self, amt=None, decode_content=None):
        yield b'{"type":"ERROR","object":{"kind":"Status","apiVersion":"v1","status":"Failure",' \
              b'"message":"too old resource version: 1 (2)","reason":"Expired","code":410}}\n'

    def shutdown(self):
        pass

    def close(self):
        pass


def test_fake_kubelet_relists_when_resource_version_is_too_old(control_plane, namespace, monkeypatch):
    core = client.CoreV1Api(control_plane.admin)
    kubelet = FakeKubelet(control_plane.api_client(), namespace=namespace)
    real_call_list, watches = kubelet._call_list, []

    def call_list(**kwargs):
        if kwargs.get("watch"):
            watches.append(kwargs["resource_version"])
            if len(watches) == 1:
                return _GoneStream()                                  # ERROR event with code 410
            if len(watches) == 2:
                raise ApiException(status=410, reason="Gone")         # 410 answer to the watch request
        return real_call_list(**kwargs)

    monkeypatch.setattr(kubelet, "_call_list", call_list)
    with kubelet:
        control_plane.apply(_pod("after-relists", namespace, [sys.executable, "-c", "print('ok')"]))
        wait_for(lambda: core.read_namespaced_pod("after-relists", namespace).status.phase == "Succeeded", 15,
                 message=lambda: f"Pod run after relisting; errors: {kubelet.errors}")
    assert kubelet.relists >= 3 and len(watches) >= 3
    assert kubelet.handled == {"after-relists": "run"} and not kubelet.errors


def _config_map(name: str, namespace: str, owner: dict | None = None) -> dict:
    meta: dict = {"name": name, "namespace": namespace}
    if owner is not None:
        meta["ownerReferences"] = [{
            "apiVersion": owner["apiVersion"], "kind": owner["kind"], "name": owner["metadata"]["name"],
            "uid": owner["metadata"]["uid"], "blockOwnerDeletion": False}]
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {"x": "1"}}


@pytest.mark.parametrize("owner_kind", ["ConfigMap", "HarnessWidget"])
def test_garbage_collector_deletes_dependents(control_plane, namespace, owner_kind):
    core = client.CoreV1Api(control_plane.admin)
    if owner_kind == "ConfigMap":
        owner = control_plane.apply(_config_map("owner", namespace))
    else:   # a custom resource of a CRD applied before kube-controller-manager started
        owner = control_plane.apply({"apiVersion": "harness.fedfm.test/v1", "kind": "HarnessWidget",
                                     "metadata": {"name": "owner", "namespace": namespace}, "spec": {}})
    control_plane.apply(_config_map("dependent", namespace, owner))
    control_plane.apply(_config_map("bystander", namespace))
    assert control_plane.delete(owner)

    def collected():
        try:
            core.read_namespaced_config_map("dependent", namespace)
            return False
        except ApiException as exc:
            if exc.status == 404:
                return True
            raise
    wait_for(collected, 30, message=lambda: f"dependent collected; kcm.log:\n{control_plane.log_tail('kcm', 15)}")
    assert core.read_namespaced_config_map("bystander", namespace).data == {"x": "1"}
