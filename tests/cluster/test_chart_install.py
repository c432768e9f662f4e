"""The Helm chart installed, upgraded and uninstalled with Helm's Go SDK against the real control plane;
then the real apiserver's authorizer (SubjectAccessReview) says what each identity may do."""

from __future__ import annotations

import json
from pathlib import Path

import helm_python as helm
import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kube import wait_for

from fedfm.operators.api import CLIENT_ROUNDS, FEDERATED_CLIENTS, GROUP, VERSION

pytestmark = [pytest.mark.cluster]

CHART = Path(__file__).resolve().parents[2] / "charts" / "fedfm"
# Not "fedfm": the operator tests of this session already hold the ClusterRole "fedfm-operator".
RELEASE, NAMESPACE, PLATFORM = "fedfm-chart", "fedfm-chart", "kubeflow-chart"
OPERATOR = f"{RELEASE}-operator"


def _tenant(name: str, namespace: str, **extra) -> dict:
    return {"name": name, "namespace": namespace, "federation": {"name": "support"},
            "data": {"uri": f"s3://{name}/train.csv"}, **extra}


VALUES = {
    "pipeline": {"namespace": PLATFORM, "serviceAccount": "default-editor"},
    "tenants": [_tenant("a", "chart-tenant-a", createNamespace=True),
                _tenant("b", "chart-tenant-b", createNamespace=True,
                        resources={"cpu": 4, "memory": "16Gi", "gpus": 1, "nodeSelector": {"pool": "gpu"}})],
}


def _can(plane, user: str, verb: str, resource: str, namespace: str = "", group: str = "",
         subresource: str = "") -> bool:
    review = client.V1SubjectAccessReview(spec=client.V1SubjectAccessReviewSpec(
        user=user, resource_attributes=client.V1ResourceAttributes(
            verb=verb, resource=resource, namespace=namespace or None, group=group, subresource=subresource or None)))
    return client.AuthorizationV1Api(plane.admin).create_subject_access_review(review).status.allowed


def _exists(call) -> bool:
    try:
        call()
        return True
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise


@pytest.fixture(scope="module")
def helm_config(control_plane):
    control_plane.create_namespace(PLATFORM)
    config = helm.Config(kubeconfig_path=control_plane.kubeconfig, namespace=NAMESPACE)
    yield config
    config.close()


def test_install_upgrade_uninstall_and_the_rbac_that_results(control_plane, helm_config):
    plane = control_plane
    core, custom, rbac_api = client.CoreV1Api(plane.admin), client.CustomObjectsApi(plane.admin), \
        client.RbacAuthorizationV1Api(plane.admin)
    helm_config.install(str(CHART), RELEASE, VALUES, create_namespace=True)

    # what the chart created, as the apiserver stores it
    deployment = client.AppsV1Api(plane.admin).read_namespaced_deployment(OPERATOR, NAMESPACE)
    assert deployment.spec.template.spec.containers[0].security_context.read_only_root_filesystem is True
    for tenant, namespace in (("a", "chart-tenant-a"), ("b", "chart-tenant-b")):
        enrolled = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, FEDERATED_CLIENTS, tenant)
        assert enrolled["spec"]["federationRef"] == {"name": "support", "namespace": PLATFORM}
    gpu = custom.get_namespaced_custom_object(GROUP, VERSION, "chart-tenant-b", FEDERATED_CLIENTS, "b")
    assert gpu["spec"]["resources"]["gpus"] == 1

    # the operator's identity may do exactly what the operator uses, cluster-wide, and nothing else
    operator = f"system:serviceaccount:{NAMESPACE}:{OPERATOR}"
    for namespace in ("chart-tenant-a", "chart-tenant-b", PLATFORM):
        assert _can(plane, operator, "create", "jobs", namespace, "batch")
        assert _can(plane, operator, "delete", "jobs", namespace, "batch")
        assert _can(plane, operator, "patch", CLIENT_ROUNDS, namespace, GROUP, "status")
        assert _can(plane, operator, "create", "events", namespace)
    assert _can(plane, operator, "watch", "federations", "", GROUP)
    assert _can(plane, operator, "list", "customresourcedefinitions", "", "apiextensions.k8s.io")
    for verb, resource, group in (("get", "secrets", ""), ("list", "pods", ""), ("create", "pods", ""),
                                  ("delete", "federations", GROUP), ("create", CLIENT_ROUNDS, GROUP),
                                  ("update", "deployments", "apps"), ("create", "rolebindings",
                                                                     "rbac.authorization.k8s.io"),
                                  ("patch", "jobs", "batch"), ("delete", "customresourcedefinitions",
                                                               "apiextensions.k8s.io")):
        assert not _can(plane, operator, verb, resource, "chart-tenant-a", group), (verb, resource)

    # the pipeline hands work to enrolled tenants only; a tenant's Jobs see only their own enrolment
    pipeline = f"system:serviceaccount:{PLATFORM}:default-editor"
    assert _can(plane, pipeline, "create", CLIENT_ROUNDS, "chart-tenant-a", GROUP)
    assert _can(plane, pipeline, "patch", "federations", PLATFORM, GROUP, "status")
    assert not _can(plane, pipeline, "create", CLIENT_ROUNDS, "default", GROUP)
    assert not _can(plane, pipeline, "create", "jobs", "chart-tenant-a", "batch")
    tenant_a = "system:serviceaccount:chart-tenant-a:fedfm-client"
    assert _can(plane, tenant_a, "get", FEDERATED_CLIENTS, "chart-tenant-a", GROUP)
    assert not _can(plane, tenant_a, "get", FEDERATED_CLIENTS, "chart-tenant-b", GROUP)
    assert not _can(plane, tenant_a, "patch", FEDERATED_CLIENTS, "chart-tenant-a", GROUP)

    # Kubeflow's kubeflow-edit aggregates FedFM's role: a profile user bound to it creates Federations
    plane.apply({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
                 "metadata": {"name": "kubeflow-edit"},
                 "aggregationRule": {"clusterRoleSelectors": [{"matchLabels": {
                     "rbac.authorization.kubeflow.org/aggregate-to-kubeflow-edit": "true"}}]}, "rules": []})
    plane.apply({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                 "metadata": {"name": "user-kubeflow-edit", "namespace": PLATFORM},
                 "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "kubeflow-edit"},
                 "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "alice@example.com"}]})
    wait_for(lambda: _can(plane, "alice@example.com", "create", "federations", PLATFORM, GROUP), 60,
             message="kubeflow-edit did not aggregate fedfm's role")
    assert not _can(plane, "alice@example.com", "create", CLIENT_ROUNDS, PLATFORM, GROUP)

    # upgrade: tenant b leaves, tenant c joins, monitoring on; Helm removes what b had
    upgraded = dict(VALUES, tenants=[VALUES["tenants"][0], _tenant("c", "chart-tenant-c", createNamespace=True)])
    helm_config.upgrade(str(CHART), RELEASE, upgraded)
    assert _exists(lambda: custom.get_namespaced_custom_object(GROUP, VERSION, "chart-tenant-c",
                                                               FEDERATED_CLIENTS, "c"))
    wait_for(lambda: not _exists(lambda: custom.get_namespaced_custom_object(GROUP, VERSION, "chart-tenant-b",
                                                                             FEDERATED_CLIENTS, "b")), 30)
    assert not _exists(lambda: rbac_api.read_namespaced_role_binding("fedfm-pipeline", "chart-tenant-b"))
    assert not _can(plane, pipeline, "create", CLIENT_ROUNDS, "chart-tenant-b", GROUP)
    assert _can(plane, pipeline, "create", CLIENT_ROUNDS, "chart-tenant-c", GROUP)

    # operator.watchNamespaces: the operator's rules become a Role in each of those namespaces, nothing cluster-wide
    watched = [PLATFORM, "chart-tenant-a", "chart-tenant-c"]
    helm_config.upgrade(str(CHART), RELEASE, dict(upgraded, operator={"watchNamespaces": watched}))
    wait_for(lambda: not _exists(lambda: rbac_api.read_cluster_role(OPERATOR)), 30)
    for namespace in watched:
        assert _can(plane, operator, "create", "jobs", namespace, "batch")
        assert _can(plane, operator, "list", CLIENT_ROUNDS, namespace, GROUP)
    assert not _can(plane, operator, "create", "jobs", "default", "batch")
    assert not _can(plane, operator, "list", CLIENT_ROUNDS, "", GROUP)  # across all namespaces: refused
    assert not _can(plane, operator, "list", "customresourcedefinitions", "", "apiextensions.k8s.io")

    # uninstall: everything of the release goes, but tenants' namespaces (and the CRDs) stay
    helm_config.uninstall(RELEASE)
    wait_for(lambda: not _exists(lambda: client.AppsV1Api(plane.admin).read_namespaced_deployment(
        OPERATOR, NAMESPACE)), 30)
    assert not _exists(lambda: rbac_api.read_cluster_role(OPERATOR))
    assert not _can(plane, operator, "create", "jobs", "chart-tenant-a", "batch")
    assert not _can(plane, pipeline, "create", CLIENT_ROUNDS, "chart-tenant-a", GROUP)
    assert _exists(lambda: core.read_namespace("chart-tenant-a"))
    assert _exists(lambda: client.ApiextensionsV1Api(plane.admin).read_custom_resource_definition(
        f"{FEDERATED_CLIENTS}.{GROUP}"))


class OpenAPISchemas:
    """The apiserver's own OpenAPI v2 document (core kinds and, since v1.15, the CRDs' schemas) and a
    strict check of an object against it: unknown fields, wrong types and missing required fields are
    errors, as `kubectl --validate` reports them."""

    def __init__(self, document: dict):
        self.definitions = document["definitions"]
        self.by_kind = {(gvk.get("group", ""), gvk["version"], gvk["kind"]): name
                        for name, definition in self.definitions.items()
                        for gvk in definition.get("x-kubernetes-group-version-kind", [])}

    def errors(self, obj: dict) -> list[str]:
        group, _, version = obj["apiVersion"].rpartition("/")
        name = self.by_kind.get((group, version, obj["kind"]))
        if name is None:
            return [f"the apiserver has no schema for {obj['apiVersion']} {obj['kind']}"]
        return self._check(obj, {"$ref": f"#/definitions/{name}"}, obj["kind"])

    def _check(self, value, schema: dict, path: str) -> list[str]:
        if "$ref" in schema:
            schema = self.definitions[schema["$ref"].rsplit("/", 1)[-1]]
        if schema.get("format") == "int-or-string" or schema.get("x-kubernetes-int-or-string"):
            return [] if isinstance(value, (int, str)) else [f"{path}: {value!r} is not an int or a string"]
        if schema.get("x-kubernetes-preserve-unknown-fields") and "properties" not in schema:
            return []
        kind = schema.get("type")
        if kind == "object" or "properties" in schema:
            if not isinstance(value, dict):
                return [f"{path}: expected an object, got {value!r}"]
            errors = [f"{path}: missing required field {field!r}" for field in schema.get("required", [])
                      if field not in value]
            properties = schema.get("properties")
            for key, child in value.items():
                if properties is not None and key in properties:
                    errors += self._check(child, properties[key], f"{path}.{key}")
                elif isinstance(schema.get("additionalProperties"), dict):
                    errors += self._check(child, schema["additionalProperties"], f"{path}.{key}")
                elif properties is not None and not schema.get("x-kubernetes-preserve-unknown-fields"):
                    errors.append(f"{path}: unknown field {key!r}")
            return errors
        if kind == "array":
            if not isinstance(value, list):
                return [f"{path}: expected a list, got {value!r}"]
            return [error for index, item in enumerate(value)
                    for error in self._check(item, schema.get("items", {}), f"{path}[{index}]")]
        expected = {"string": str, "integer": int, "number": (int, float), "boolean": bool}.get(kind)
        if expected and (not isinstance(value, expected) or (kind != "boolean" and isinstance(value, bool))):
            return [f"{path}: {value!r} is not a {kind}"]
        return []


def _published_schemas(plane, crds: list[dict]) -> OpenAPISchemas | None:
    """The apiserver's OpenAPI document, once it carries every CRD's kind, else None."""
    response = plane.admin.call_api("/openapi/v2", "GET", _preload_content=False, auth_settings=["BearerToken"])
    schemas = OpenAPISchemas(json.loads(response[0].data))
    kinds = {(crd["spec"]["group"], version["name"], crd["spec"]["names"]["kind"])
             for crd in crds for version in crd["spec"]["versions"] if version.get("served")}
    return schemas if kinds <= schemas.by_kind.keys() else None


def test_every_rendered_object_is_valid_for_the_apiservers_openapi_schemas(control_plane):
    values = dict(VALUES, metrics={"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}})
    chart = helm.Chart.load(CHART)
    try:
        files = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
        crds = [yaml.safe_load(crd["data"]) for crd in chart.crds]
    finally:
        chart.close()
    # The apiserver publishes a CRD's schema a few seconds after the CRD is Established, not with it.
    schemas = wait_for(lambda: _published_schemas(control_plane, crds), 60,
                       message="the apiserver's OpenAPI document never carried the chart's CRDs")
    objects = [doc for name, text in files.items() if name.endswith(".yaml") for doc in yaml.safe_load_all(text)
               if doc]
    # prometheus-operator's kinds need its CRDs, which this control plane does not have
    monitoring = [o for o in objects if o["apiVersion"].startswith("monitoring.coreos.com/")]
    assert sorted(o["kind"] for o in monitoring) == ["PrometheusRule", "ServiceMonitor"]
    checked = [o for o in objects + crds if o not in monitoring]
    assert {o["kind"] for o in checked} >= {"Deployment", "Service", "ServiceAccount", "ClusterRole", "Role",
                                             "RoleBinding", "ClusterRoleBinding", "ConfigMap", "Namespace",
                                             "FederatedClient"}
    problems = {f"{o['kind']}/{o['metadata']['name']}": schemas.errors(o) for o in checked}
    assert {key: errors for key, errors in problems.items() if errors} == {}
    # and the check does catch what the apiserver would silently drop
    broken = next(o for o in objects if o["kind"] == "Deployment")
    broken = json.loads(json.dumps(broken))
    broken["spec"]["template"]["spec"]["containers"][0]["securityContxt"] = {}
    broken["spec"]["replicas"] = "one"
    assert sorted(schemas.errors(broken)) == [
        "Deployment.spec.replicas: 'one' is not a integer",
        "Deployment.spec.template.spec.containers[0]: unknown field 'securityContxt'"]
