"""The Helm chart, through Helm's own Go SDK (helm-python-sdk): lint, render, the values schema, and the
monitoring it ships (alert rules, dashboard) against the metrics the operator really exports."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import helm_python as helm
import pytest
import yaml

from prometheus_server import ensure_prometheus

from fedfm.operators import metrics, rbac

CHART = Path(__file__).resolve().parents[2] / "charts" / "fedfm"
RELEASE, NAMESPACE = "fedfm", "fedfm-system"

TWO_TENANTS = {
    "pipeline": {"namespace": "kubeflow-user", "serviceAccount": "default-editor"},
    "metrics": {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}},
    "tenants": [
        {"name": "hospital-a", "namespace": "tenant-a", "createNamespace": True,
         "federation": {"name": "support"}, "data": {"uri": "s3://a/train.csv", "secretRef": {"name": "a-s3"}},
         "labels": {"fedfm.dev/enrolled": "true"}},
        {"name": "bank-b", "namespace": "tenant-b", "federation": {"name": "support", "namespace": "kubeflow-user"},
         "data": {"pvc": {"claimName": "b-data", "path": "train.parquet"}},
         "state": {"pvc": {"claimName": "b-state", "path": "fedfm"}}, "signingKey": "0b" * 32,
         "modelPolicy": {"allowedModels": ["meta-llama/Llama-3.2-1B@4e20de36"], "allowRemoteCode": False},
         "env": [{"name": "HTTPS_PROXY", "value": "http://proxy.b:3128"}],
         "serviceAccount": {"create": False, "name": "b-jobs"}, "image": "registry.example/fedfm:gpu",
         "resources": {"cpu": 8, "memory": "32Gi", "gpus": 2, "nodeSelector": {"pool": "gpu"},
                       "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}},
    ],
}


def render(values: dict | None = None) -> list[dict]:
    chart = helm.Chart.load(CHART)
    try:
        files = chart.render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)
    finally:
        chart.close()
    return [doc for name, text in sorted(files.items()) if name.endswith(".yaml")
            for doc in yaml.safe_load_all(text) if doc]


def find(objects: list[dict], kind: str, name: str | None = None, namespace: str | None = None) -> list[dict]:
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
            and (namespace is None or o["metadata"].get("namespace") == namespace)]


def test_lint_strict_is_clean():
    result = helm.lint(CHART, strict=True, namespace=NAMESPACE)
    assert result["errors"] == []
    # severity 1 is INFO (e.g. "icon is recommended"); nothing at WARNING (2) or above
    assert [m for m in result["messages"] if m["severity"] >= 2] == []
    result = helm.lint(CHART, TWO_TENANTS, strict=True, namespace=NAMESPACE)
    assert result["errors"] == [] and [m for m in result["messages"] if m["severity"] >= 2] == []


def test_default_values_render_the_operator_and_its_exact_rbac():
    objects = render()
    assert {o["kind"] for o in objects} == {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Deployment",
                                            "Service", "ConfigMap"}
    deployment = find(objects, "Deployment", "fedfm-operator", NAMESPACE)[0]
    pod = deployment["spec"]["template"]["spec"]
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["serviceAccountName"] == "fedfm-operator"
    container = pod["containers"][0]
    assert container["image"] == "ghcr.io/fedfm/fedfm-operator:0.1.0"
    assert container["command"] == ["python", "-m", "fedfm.operators"]
    assert "--metrics-port=8080" in container["args"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz" and container["readinessProbe"]
    assert container["resources"]["requests"] and container["resources"]["limits"]
    # the operator's ClusterRole carries exactly the rules operators/rbac.py defines, bound to its account
    role = find(objects, "ClusterRole", "fedfm-operator")[0]
    assert role["rules"] == rbac.operator_cluster_role()["rules"]
    binding = find(objects, "ClusterRoleBinding", "fedfm-operator")[0]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "fedfm-operator", "namespace": NAMESPACE}]
    # Kubeflow profile users can create Federations through the aggregated roles
    edit = find(objects, "ClusterRole", "fedfm-kubeflow-edit")[0]
    assert edit["metadata"]["labels"]["rbac.authorization.kubeflow.org/aggregate-to-kubeflow-edit"] == "true"
    assert {"create", "delete"} <= set(edit["rules"][0]["verbs"]) and edit["rules"][0]["resources"] == ["federations"]
    service = find(objects, "Service", "fedfm-operator-metrics", NAMESPACE)[0]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    dashboard = find(objects, "ConfigMap", "fedfm-dashboard", NAMESPACE)[0]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["fedfm.json"])["uid"] == "fedfm-overview"


def test_the_operator_gets_the_storage_credentials_it_reads_updates_with():
    container = find(render({"operator": {"envFrom": [{"secretRef": {"name": "fedfm-storage"}}],
                                          "env": [{"name": "AWS_DEFAULT_REGION", "value": "eu-west-1"}]}}),
                     "Deployment", "fedfm-operator", NAMESPACE)[0]["spec"]["template"]["spec"]["containers"][0]
    assert container["envFrom"] == [{"secretRef": {"name": "fedfm-storage"}}]
    assert {"name": "AWS_DEFAULT_REGION", "value": "eu-west-1"} in container["env"]
    assert {"name": "HOME", "value": "/tmp"} in container["env"]  # the chart's own stay
    default = find(render(), "Deployment", "fedfm-operator", NAMESPACE)[0]["spec"]["template"]["spec"]["containers"][0]
    assert "envFrom" not in default


def test_images_pinned_by_digest_run_what_was_pushed_whatever_the_tag():
    """Once pushed, the images are named by the digest the registry gave them (issue 17, finding 12): a tag can
    be moved to other bytes, a digest cannot."""
    operator_digest, client_digest = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    objects = render({**TWO_TENANTS, "operator": {"image": {"repository": "registry.example/fedfm-operator",
                                                            "tag": "moved", "digest": operator_digest}},
                      "clientImage": {"repository": "registry.example/fedfm", "digest": client_digest}})
    container = find(objects, "Deployment", "fedfm-operator", NAMESPACE)[0]["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == f"registry.example/fedfm-operator@{operator_digest}"
    assert find(objects, "FederatedClient", "hospital-a", "tenant-a")[0]["spec"]["image"] == \
        f"registry.example/fedfm@{client_digest}"
    with pytest.raises(Exception, match="digest"):
        render({"clientImage": {"repository": "registry.example/fedfm", "digest": "latest"}})


def test_two_tenants_with_a_gpu_tenant_and_monitoring_on():
    objects = render(TWO_TENANTS)
    assert [o["metadata"]["name"] for o in find(objects, "Namespace")] == ["tenant-a"]  # only where asked
    assert find(objects, "Namespace")[0]["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    # tenant a: its own service account; tenant b: an existing one, not created
    assert [(o["metadata"]["namespace"], o["metadata"]["name"]) for o in find(objects, "ServiceAccount")
            if o["metadata"]["namespace"] != NAMESPACE] == [("tenant-a", "fedfm-client")]
    for namespace, account in (("tenant-a", "fedfm-client"), ("tenant-b", "b-jobs")):
        assert find(objects, "Role", "fedfm-tenant", namespace)[0]["rules"] == rbac.tenant_role()["rules"]
        assert find(objects, "RoleBinding", "fedfm-tenant", namespace)[0]["subjects"][0]["name"] == account
        assert find(objects, "Role", "fedfm-pipeline", namespace)[0]["rules"] == rbac.pipeline_role()["rules"]
        subjects = find(objects, "RoleBinding", "fedfm-pipeline", namespace)[0]["subjects"]
        assert subjects == [{"kind": "ServiceAccount", "name": "default-editor", "namespace": "kubeflow-user"}]
    assert find(objects, "Role", "fedfm-pipeline-federation", "kubeflow-user")[0]["rules"] == \
        rbac.pipeline_federation_role()["rules"]

    a = find(objects, "FederatedClient", "hospital-a", "tenant-a")[0]
    assert a["spec"]["federationRef"] == {"name": "support", "namespace": "kubeflow-user"}  # pipeline.namespace
    assert a["metadata"]["labels"]["fedfm.dev/enrolled"] == "true"
    assert a["spec"]["image"] == "ghcr.io/fedfm/fedfm:0.1.0" and a["spec"]["serviceAccountName"] == "fedfm-client"
    b = find(objects, "FederatedClient", "bank-b", "tenant-b")[0]
    assert b["spec"]["resources"]["gpus"] == 2 and b["spec"]["resources"]["nodeSelector"] == {"pool": "gpu"}
    assert b["spec"]["data"] == {"pvc": {"claimName": "b-data", "path": "train.parquet"}}
    # where b keeps its secrets and which models may run next to its data: b's to say, in its FederatedClient
    assert b["spec"]["state"] == {"pvc": {"claimName": "b-state", "path": "fedfm"}}
    assert b["spec"]["signingKey"] == "0b" * 32 and "signingKey" not in a["spec"]
    assert b["spec"]["modelPolicy"] == {"allowedModels": ["meta-llama/Llama-3.2-1B@4e20de36"],
                                        "allowRemoteCode": False}
    assert b["spec"]["env"] == [{"name": "HTTPS_PROXY", "value": "http://proxy.b:3128"}]
    assert "state" not in a["spec"] and "modelPolicy" not in a["spec"] and "env" not in a["spec"]
    assert b["spec"]["image"] == "registry.example/fedfm:gpu" and b["spec"]["serviceAccountName"] == "b-jobs"

    monitor = find(objects, "ServiceMonitor", "fedfm-operator", NAMESPACE)[0]
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    rules = find(objects, "PrometheusRule", "fedfm-operator", NAMESPACE)[0]
    shipped = yaml.safe_load((CHART / "alerts" / "fedfm.rules.yaml").read_text())
    assert rules["spec"]["groups"] == shipped["groups"]


@pytest.mark.parametrize("values, where", [
    ({"operator": {"metricsPort": "eighty"}}, "/operator/metricsPort"),
    ({"operator": {"replicas": 2}}, "/operator"),  # unknown key: a typo must not pass silently
    ({"tenants": [{"name": "a", "namespace": "Tenant_A", "federation": {"name": "f"}, "data": {"uri": "s3://x"}}]},
     "/tenants/0/namespace"),
    ({"tenants": [{"name": "a", "namespace": "t", "federation": {"name": "f"}}]}, "/tenants/0"),  # no data
    ({"tenants": [{"name": "a", "namespace": "t", "federation": {"name": "f"},
                   "data": {"pvc": {"claimName": "c"}}}]}, "/tenants/0/data"),  # pvc without a path
    ({"tenants": [{"name": "a", "namespace": "t", "federation": {"name": "f"}, "data": {"uri": "s3://x"},
                   "resources": {"gpus": -1}}]}, "/tenants/0/resources/gpus"),
    ({"metrics": {"serviceMonitor": {"interval": "often"}}}, "/metrics/serviceMonitor/interval"),
    ({"operator": {"envFrom": [{"secret": {"name": "s"}}]}}, "/operator/envFrom/0"),
])
def test_the_schema_rejects_bad_values(values, where):
    with pytest.raises(helm.HelmValuesError) as refused:
        render(values)
    assert f"at '{where}" in str(refused.value)


def test_a_tenant_without_a_federation_namespace_needs_the_pipeline_namespace():
    values = {"tenants": [{"name": "a", "namespace": "t", "federation": {"name": "f"}, "data": {"uri": "s3://x"}}]}
    needed = r"tenants\[a\].federation.namespace \(or pipeline.namespace\) is required"
    with pytest.raises(helm.HelmError, match=needed):
        render(values)


def _exported_metric_names() -> set[str]:
    """Every sample name the operator's registry can export (histograms add _bucket/_sum/_count)."""
    names = set()
    for collector in metrics.__dict__.values():
        if hasattr(collector, "_type") and hasattr(collector, "_name"):
            base = collector._name + ("_total" if collector._type == "counter" else "")
            names.add(base)
            if collector._type == "histogram":
                names |= {f"{collector._name}_{suffix}" for suffix in ("bucket", "sum", "count")}
        elif isinstance(collector, dict):
            names |= {gauge._name for gauge in collector.values() if hasattr(gauge, "_name")}
    return names


_FUNCTIONS = {"sum", "max", "min", "avg", "rate", "increase", "histogram_quantile", "by", "on", "absent",
              "label_values", "without", "count", "up"}


def _metric_names(expr: str) -> set[str]:
    without_labels = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\"[^\"]*\"", "", expr)
    return {token for token in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", without_labels)
            if token not in _FUNCTIONS and token.startswith("fedfm_")}


def test_dashboard_and_alerts_query_only_metrics_the_operator_exports():
    exported = _exported_metric_names()
    assert {"fedfm_rounds_completed", "fedfm_clients", "fedfm_client_rounds_total", "fedfm_bytes_total",
            "fedfm_round_duration_seconds_bucket", "fedfm_global_eval_loss", "fedfm_update_norm_bucket"} <= exported
    dashboard = json.loads((CHART / "dashboards" / "fedfm.json").read_text())
    queried = {name for panel in dashboard["panels"] for target in panel["targets"]
               for name in _metric_names(target["expr"])}
    queried |= _metric_names(dashboard["templating"]["list"][1]["query"]["query"])
    alerts = yaml.safe_load((CHART / "alerts" / "fedfm.rules.yaml").read_text())
    queried |= {name for group in alerts["groups"] for rule in group["rules"] for name in _metric_names(rule["expr"])}
    assert queried and queried <= exported, sorted(queried - exported)
    assert {"fedfm_rounds_completed", "fedfm_clients", "fedfm_bytes_total", "fedfm_global_eval_accuracy"} <= queried


def test_the_alert_rules_pass_promtool():
    ensure_prometheus()
    result = subprocess.run(["promtool", "check", "rules", str(CHART / "alerts" / "fedfm.rules.yaml")],
                            capture_output=True, text=True)
    assert result.returncode == 0 and "SUCCESS: 3 rules found" in result.stdout, result.stdout + result.stderr


_VALIDATE_MONITORING = """
import { readFileSync } from "node:fs";
import * as kinds from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1";
for (const obj of JSON.parse(readFileSync(process.argv[2], "utf8"))) {
  try { new kinds[obj.kind](obj).validate(); console.log(`${obj.kind}: valid`); }
  catch (error) { console.log(`${obj.kind}: ${error.message}`); }
}
"""


def test_the_monitoring_objects_match_prometheus_operators_schemas(tmp_path):
    """prometheus-operator's kinds are not on the test control plane, so their schemas come from the npm
    registry as compiled validators (@kubernetes-models/prometheus-operator) and run under node."""
    root = subprocess.run([str(CHART.parents[1] / "scripts" / "testenv" / "install-monitoring-schemas.sh")],
                          capture_output=True, text=True, check=True).stdout.strip()
    script = Path(root) / "validate-monitoring.mjs"  # beside node_modules, so node resolves the package
    script.write_text(_VALIDATE_MONITORING)
    monitoring = [o for o in render(TWO_TENANTS) if o["apiVersion"] == "monitoring.coreos.com/v1"]
    broken = json.loads(json.dumps(find(monitoring, "ServiceMonitor")[0]))
    broken["spec"]["endpoints"][0]["interval"] = "often"
    objects = tmp_path / "objects.json"
    objects.write_text(json.dumps(monitoring + [broken]))
    result = subprocess.run(["node", str(script), str(objects)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert sorted(lines[:2]) == ["PrometheusRule: valid", "ServiceMonitor: valid"]
    assert lines[2].startswith("ServiceMonitor: ") and "interval must match pattern" in lines[2]


WATCHED = ["kubeflow-user", "tenant-a", "tenant-b"]


def _operator_rbac(objects: list[dict]) -> list[dict]:
    return [o for o in objects if o["kind"] in ("Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding")
            and o["metadata"]["labels"].get("app.kubernetes.io/component") == "operator"]


def test_watch_namespaces_bind_the_operators_rules_in_each_namespace_instead_of_cluster_wide():
    """operator.watchNamespaces (issue 18): a Role and RoleBinding per watched namespace with the operator's rules
    (less the CRD read a Role cannot grant), and nothing cluster-wide. Without it, the one ClusterRole of before."""
    cluster_wide = {(o["kind"], o["metadata"]["name"]) for o in _operator_rbac(render(TWO_TENANTS))}
    assert cluster_wide == {("ClusterRole", "fedfm-operator"), ("ClusterRoleBinding", "fedfm-operator")}

    values = {**TWO_TENANTS, "operator": {"watchNamespaces": WATCHED}}
    linted = helm.lint(CHART, values, strict=True, namespace=NAMESPACE)
    assert linted["errors"] == [] and [m for m in linted["messages"] if m["severity"] >= 2] == []
    objects = render(values)
    namespaced_rules = [rule for rule in rbac.operator_cluster_role()["rules"]
                        if rule["resources"] != ["customresourcedefinitions"]]
    assert len(namespaced_rules) == len(rbac.operator_cluster_role()["rules"]) - 1
    account = [{"kind": "ServiceAccount", "name": "fedfm-operator", "namespace": NAMESPACE}]
    for namespace in WATCHED:
        assert find(objects, "Role", "fedfm-operator", namespace)[0]["rules"] == namespaced_rules
        binding = find(objects, "RoleBinding", "fedfm-operator", namespace)[0]
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "fedfm-operator"}
        assert binding["subjects"] == account
    assert not find(objects, "ClusterRole", "fedfm-operator")
    assert not find(objects, "ClusterRoleBinding", "fedfm-operator")
    assert {o["metadata"].get("namespace") for o in _operator_rbac(objects) if o["kind"].startswith("Role")} == \
        set(WATCHED)
    assert not [o for o in _operator_rbac(objects) if o["kind"].startswith("Cluster")]
    pod = find(objects, "Deployment", "fedfm-operator", NAMESPACE)[0]["spec"]["template"]["spec"]
    assert [arg for arg in pod["containers"][0]["args"] if arg.startswith("--namespace=")] == \
        [f"--namespace={ns}" for ns in WATCHED]


def test_an_operator_watching_namespaces_lists_in_each_of_them_and_never_cluster_wide(monkeypatch):
    """Its account holds Roles only (above), so a Federation's members and rounds, which live in the tenants'
    namespaces, are listed namespace by namespace: a cluster-wide list would be refused (403)."""
    from fedfm.operators import kube

    calls = []

    class Objects:
        def list_cluster_custom_object(self, group, version, plural, label_selector=""):
            calls.append(("cluster", plural, label_selector))
            return {"items": [{"metadata": {"name": "everywhere"}}]}

        def list_namespaced_custom_object(self, group, version, namespace, plural, label_selector=""):
            calls.append((namespace, plural, label_selector))
            return {"items": [{"metadata": {"name": f"{plural}-in-{namespace}"}}]}

    monkeypatch.setattr(kube, "custom", Objects)
    monkeypatch.setattr(kube, "_watched", [])
    assert [o["metadata"]["name"] for o in kube.list_objects("clientrounds", None, "f=x")] == ["everywhere"]
    kube.watch_only(["tenant-b", "kubeflow-user", "tenant-a", "tenant-b"])
    calls.clear()
    listed = kube.list_objects("clientrounds", None, "f=x")
    assert calls == [(ns, "clientrounds", "f=x") for ns in ("kubeflow-user", "tenant-a", "tenant-b")]
    assert [o["metadata"]["name"] for o in listed] == [f"clientrounds-in-{ns}" for ns in ("kubeflow-user", "tenant-a",
                                                                                            "tenant-b")]
    calls.clear()
    kube.list_objects("federatedclients", "tenant-a")
    assert calls == [("tenant-a", "federatedclients", "")]


def test_watch_namespaces_must_cover_every_tenant_and_its_federation():
    with pytest.raises(helm.HelmError, match=r"must include namespace kubeflow-user of tenants\[hospital-a\]"):
        render({**TWO_TENANTS, "operator": {"watchNamespaces": ["tenant-a", "tenant-b"]}})
    with pytest.raises(helm.HelmError, match=r"must include namespace tenant-b of tenants\[bank-b\]"):
        render({**TWO_TENANTS, "operator": {"watchNamespaces": ["kubeflow-user", "tenant-a"]}})


def _openapi_problems(value, schema: dict, path: str = "$") -> list[str]:
    """Where ``value`` breaks a structural OpenAPI v3 schema (the keywords FedFM's CRDs use). A field the schema
    does not name is a problem too: the apiserver would drop it silently, so an example must not have one."""
    if value is None:
        return [] if schema.get("nullable") else [f"{path}: null"]
    if schema.get("x-kubernetes-int-or-string"):
        return [] if isinstance(value, (int, str)) and not isinstance(value, bool) else [f"{path}: not int or string"]
    types = {"object": dict, "array": list, "string": str, "boolean": bool, "integer": int, "number": (int, float)}
    expected = schema.get("type")
    if expected and (not isinstance(value, types[expected])
                     or isinstance(value, bool) and expected in ("integer", "number")):
        return [f"{path}: {value!r} is not {expected}"]
    problems = []
    if "enum" in schema and value not in schema["enum"]:
        problems.append(f"{path}: {value!r} not in {schema['enum']}")
    for bound, exclusive, outside in (("minimum", "exclusiveMinimum", lambda v, b, x: v < b or x and v == b),
                                      ("maximum", "exclusiveMaximum", lambda v, b, x: v > b or x and v == b)):
        if bound in schema and outside(value, schema[bound], schema.get(exclusive)):
            problems.append(f"{path}: {value!r} outside {bound} {schema[bound]}")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0) or "pattern" in schema and not re.search(schema["pattern"], value):
            problems.append(f"{path}: {value!r} does not match")
    for branch_kind in ("oneOf", "anyOf"):
        if branch_kind in schema:
            matching = sum(not _openapi_problems(value, branch, path) for branch in schema[branch_kind])
            if matching == 0 or branch_kind == "oneOf" and matching > 1:
                problems.append(f"{path}: {matching} of its {branch_kind} branches match")
    if isinstance(value, dict):
        problems += [f"{path}.{name}: required" for name in schema.get("required", []) if name not in value]
        for name, item in value.items():
            if name in schema.get("properties", {}):
                problems += _openapi_problems(item, schema["properties"][name], f"{path}.{name}")
            elif isinstance(schema.get("additionalProperties"), dict):
                problems += _openapi_problems(item, schema["additionalProperties"], f"{path}.{name}")
            elif not schema.get("x-kubernetes-preserve-unknown-fields") and path != "$":
                problems.append(f"{path}.{name}: unknown field")
    if isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            problems += _openapi_problems(item, schema["items"], f"{path}[{index}]")
    return problems


def test_the_example_federation_is_valid_against_the_crd_and_for_the_operator():
    """charts/fedfm/examples/federation.yaml (issue 18): what the schema of the CRD the chart installs admits, what
    the operator accepts (spec.config a FederationConfig named as the object), and the repository's cluster-mode
    config."""
    from fedfm.config import FederationConfig

    example = yaml.safe_load((CHART / "examples" / "federation.yaml").read_text())
    crd = yaml.safe_load((CHART / "crds" / "federations.fedfm.dev.yaml").read_text())
    version = crd["spec"]["versions"][0]
    assert example["apiVersion"] == f"{crd['spec']['group']}/{version['name']}"
    assert example["kind"] == crd["spec"]["names"]["kind"]
    schema = version["schema"]["openAPIV3Schema"]
    assert _openapi_problems(example, schema) == []
    config = FederationConfig.parse(example["spec"]["config"], source="spec.config")
    assert config.name == example["metadata"]["name"] and config.execution.mode == "kubernetes"
    assert example["spec"]["config"] == yaml.safe_load((CHART.parents[1] / "examples" / "federation-cluster.yaml")
                                                       .read_text())
    assert config.execution.federation_namespace == example["metadata"]["namespace"]
    # the check has teeth: a typo, a wrong type and a value out of range are each found
    broken = json.loads(json.dumps(example))
    broken["spec"]["clientSelecter"] = {}
    broken["spec"]["config"]["rounds"] = "five"
    broken["spec"]["config"]["training"]["zero_stage"] = 4
    assert [problem.split(":")[0] for problem in _openapi_problems(broken, schema)] == \
        ["$.spec.config.rounds", "$.spec.config.training.zero_stage", "$.spec.clientSelecter"]


def test_the_notes_say_the_images_must_be_built_and_pushed_and_show_the_example():
    chart = helm.Chart.load(CHART)
    try:
        values = {"pipeline": {"namespace": "kubeflow-user"}, "operator": {"watchNamespaces": ["kubeflow-user"]}}
        notes = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)["fedfm/templates/NOTES.txt"]
    finally:
        chart.close()
    assert "make images" in notes and "push them to a registry" in notes
    assert "operator:      ghcr.io/fedfm/fedfm-operator:0.1.0" in notes
    assert "kind: Federation" in notes and "name: support-tickets" in notes
    assert "with a Role in each and nothing cluster-wide" in notes
    values_yaml = (CHART / "values.yaml").read_text()
    assert "make images REGISTRY=" in values_yaml and "push them" in values_yaml
