"""Kubernetes API access for the operator and the pipeline's executor (the official client)."""

from __future__ import annotations

import datetime
import functools

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from fedfm.operators.api import CLIENT_ROUNDS, FEDERATED_CLIENTS, FEDERATIONS, GROUP, VERSION

IN_CLUSTER_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"

# The namespaces an operator started with --namespace serves (empty: the whole cluster). Its account then holds
# Roles in those namespaces only, so a list "in every namespace" is a list in each of them.
_watched: list[str] = []


def watch_only(namespaces: list[str]) -> None:
    _watched[:] = sorted(set(namespaces))


@functools.cache
def api_client() -> client.ApiClient:
    """Credentials from the pod's service account, or KUBECONFIG outside a cluster."""
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()


def custom() -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api_client())


def batch() -> client.BatchV1Api:
    return client.BatchV1Api(api_client())


def now() -> str:
    return iso(datetime.datetime.now(datetime.timezone.utc).timestamp())


def iso(timestamp: float) -> str:
    """RFC 3339 in UTC, as Kubernetes writes times."""
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))


def seconds_since(value: str) -> float:
    return (datetime.datetime.now(datetime.timezone.utc) - parse_time(value)).total_seconds()


def _get(plural: str, namespace: str, name: str) -> dict | None:
    try:
        return custom().get_namespaced_custom_object(GROUP, VERSION, namespace, plural, name)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def get_federation(namespace: str, name: str) -> dict | None:
    return _get(FEDERATIONS, namespace, name)


def get_federated_client(namespace: str, name: str) -> dict | None:
    return _get(FEDERATED_CLIENTS, namespace, name)


def get_client_round(namespace: str, name: str) -> dict | None:
    return _get(CLIENT_ROUNDS, namespace, name)


def list_objects(plural: str, namespace: str | None = None, label_selector: str = "") -> list[dict]:
    """FedFM's objects of kind ``plural`` in ``namespace``; None: in every namespace the operator serves."""
    if namespace is None and not _watched:
        return custom().list_cluster_custom_object(GROUP, VERSION, plural, label_selector=label_selector)["items"]
    return [item for each in ([namespace] if namespace else _watched)
            for item in custom().list_namespaced_custom_object(GROUP, VERSION, each, plural,
                                                               label_selector=label_selector)["items"]]


def patch_status(plural: str, namespace: str, name: str, status: dict, resource_version: str | None = None) -> None:
    """Merge ``status`` in; with ``resource_version``, only if the object has not changed since (else 409)."""
    body: dict = {"status": status}
    if resource_version:
        body["metadata"] = {"resourceVersion": resource_version}
    custom().patch_namespaced_custom_object_status(GROUP, VERSION, namespace, plural, name, body)


def delete_job(namespace: str, name: str) -> None:
    try:
        batch().delete_namespaced_job(name, namespace, propagation_policy="Background")
    except ApiException as exc:
        if exc.status != 404:
            raise


def selector_matches(selector: dict | None, labels: dict | None) -> bool:
    """Kubernetes LabelSelector semantics (matchLabels and matchExpressions); empty selects everything."""
    selector, labels = selector or {}, labels or {}
    if any(labels.get(key) != value for key, value in (selector.get("matchLabels") or {}).items()):
        return False
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = expression["key"], expression["operator"], expression.get("values") or []
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and key in labels and labels[key] in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True
