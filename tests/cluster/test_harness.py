"""Tests of the cluster test harness itself: the control plane, RBAC, apply, and the real garbage collector.
(Pods and Jobs on the real kubelet: test_node.py.)"""

from __future__ import annotations

import uuid

import pytest
from kube import api_client_from_kubeconfig, apply, crd_established, wait_for
from kubernetes import client
from kubernetes.client.rest import ApiException

pytestmark = pytest.mark.cluster


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
    else:   # a custom resource: the collector finds its CRD at a discovery (every 30 s)
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
    wait_for(collected, 75, message="dependent never collected")
    assert core.read_namespaced_config_map("bystander", namespace).data == {"x": "1"}
