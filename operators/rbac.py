"""The RBAC model of cluster mode, as manifests.

- The **operator** (ClusterRole ``fedfm-operator``) reads and patches the three kinds, writes their
  status, creates, follows and deletes Jobs (and Kubeflow Trainer's TrainJobs), posts Events, and reads
  CRDs (kopf discovers its resources that way) — and nothing else (no Secrets, no Pods).
- The **pipeline** (Role ``fedfm-pipeline`` in each enrolled tenant namespace, bound to the pipeline's
  service account) may create, get, list and watch ClientRounds there, and nothing in a namespace
  that never enrolled; in the platform namespace it may read the Federation and patch its status.
- A **tenant's** service account (Role ``fedfm-tenant``) may see its own namespace's FederatedClients
  and ClientRounds; it gets nothing anywhere else.

The rules live here; the chart (charts/fedfm) includes the static ones from ``charts/fedfm/rbac/``
(regenerate with ``python -m fedfm.operators.rbac --write charts/fedfm/rbac``) and binds them per
install and per tenant.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from fedfm.operators.api import CLIENT_ROUNDS, FEDERATED_CLIENTS, FEDERATIONS, GROUP

OPERATOR_ROLE = "fedfm-operator"
PIPELINE_ROLE = "fedfm-pipeline"
PIPELINE_FEDERATION_ROLE = "fedfm-pipeline-federation"
TENANT_ROLE = "fedfm-tenant"
_KINDS = [FEDERATIONS, FEDERATED_CLIENTS, CLIENT_ROUNDS]


def _rule(groups: list[str], resources: list[str], verbs: list[str]) -> dict:
    return {"apiGroups": groups, "resources": resources, "verbs": verbs}


def operator_cluster_role() -> dict:
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": OPERATOR_ROLE},
            "rules": [
                _rule([GROUP], _KINDS, ["get", "list", "watch", "patch"]),
                _rule([GROUP], [f"{kind}/status" for kind in _KINDS], ["get", "patch"]),
                _rule(["batch"], ["jobs"], ["get", "list", "watch", "create", "delete"]),
                # multi-node clients' fine-tunes (Kubeflow Trainer); unused where Trainer is not installed
                _rule(["trainer.kubeflow.org"], ["trainjobs"], ["get", "list", "watch", "create", "delete"]),
                # kopf discovers the resources it serves by watching the CRDs (read-only)
                _rule(["apiextensions.k8s.io"], ["customresourcedefinitions"], ["get", "list", "watch"]),
                _rule([""], ["events"], ["create"]),
                _rule(["events.k8s.io"], ["events"], ["create"]),
            ]}


def pipeline_role() -> dict:
    """In a tenant namespace: what the pipeline needs to hand that tenant its work."""
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": PIPELINE_ROLE},
            "rules": [_rule([GROUP], [CLIENT_ROUNDS], ["create", "get", "list", "watch"])]}


def pipeline_federation_role() -> dict:
    """In the platform namespace: read the Federation, report rounds on its status."""
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": PIPELINE_FEDERATION_ROLE},
            "rules": [_rule([GROUP], [FEDERATIONS], ["get", "list", "watch"]),
                      _rule([GROUP], [f"{FEDERATIONS}/status"], ["get", "patch"])]}


def tenant_role() -> dict:
    """In a tenant namespace: its own enrolment and rounds, read-only."""
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": TENANT_ROLE},
            "rules": [_rule([GROUP], [FEDERATED_CLIENTS, CLIENT_ROUNDS], ["get", "list", "watch"])]}


def _in(namespace: str, role: dict) -> dict:
    return {**role, "metadata": {**role["metadata"], "namespace": namespace}}


def _binding(kind: str, name: str, role_kind: str, role: str, subject_namespace: str, subject: str,
             namespace: str | None = None) -> dict:
    metadata = {"name": name} if namespace is None else {"name": name, "namespace": namespace}
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": kind, "metadata": metadata,
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": role_kind, "name": role},
            "subjects": [{"kind": "ServiceAccount", "name": subject, "namespace": subject_namespace}]}


def operator_manifests(namespace: str, service_account: str = OPERATOR_ROLE) -> list[dict]:
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": service_account, "namespace": namespace}},
        operator_cluster_role(),
        _binding("ClusterRoleBinding", OPERATOR_ROLE, "ClusterRole", OPERATOR_ROLE, namespace, service_account),
    ]


def pipeline_manifests(platform_namespace: str, service_account: str, tenant_namespaces: list[str]) -> list[dict]:
    manifests = [_in(platform_namespace, pipeline_federation_role()),
                 _binding("RoleBinding", PIPELINE_FEDERATION_ROLE, "Role", PIPELINE_FEDERATION_ROLE,
                          platform_namespace, service_account, platform_namespace)]
    for tenant in tenant_namespaces:
        manifests += [_in(tenant, pipeline_role()),
                      _binding("RoleBinding", PIPELINE_ROLE, "Role", PIPELINE_ROLE, platform_namespace,
                               service_account, tenant)]
    return manifests


def tenant_manifests(namespace: str, service_account: str) -> list[dict]:
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": service_account, "namespace": namespace}},
        _in(namespace, tenant_role()),
        _binding("RoleBinding", TENANT_ROLE, "Role", TENANT_ROLE, namespace, service_account, namespace),
    ]


def static_roles() -> dict[str, dict]:
    return {"operator-clusterrole.yaml": operator_cluster_role(), "pipeline-role.yaml": pipeline_role(),
            "pipeline-federation-role.yaml": pipeline_federation_role(), "tenant-role.yaml": tenant_role()}


def render(manifest: dict) -> str:
    return ("# Generated by `python -m fedfm.operators.rbac --write charts/fedfm/rbac`; do not edit.\n"
            + yaml.safe_dump(manifest, sort_keys=False))


def main() -> None:
    parser = argparse.ArgumentParser(description="Write FedFM's RBAC roles as YAML.")
    parser.add_argument("--write", type=Path, required=True)
    args = parser.parse_args()
    args.write.mkdir(parents=True, exist_ok=True)
    for file_name, manifest in static_roles().items():
        (args.write / file_name).write_text(render(manifest))
        print(f"wrote {args.write / file_name}")


if __name__ == "__main__":
    main()
