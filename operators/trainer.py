"""Kubeflow Trainer (v2) as the engine of multi-node clients.

A FederatedClient with ``spec.resources.nodes`` > 1 trains as a ``trainer.kubeflow.org`` TrainJob
(:func:`fedfm.operators.jobs.train_job_manifest`) on the training runtime the chart installs when
``trainer.enabled`` (the operator's ``--training-runtime``); Trainer, the distributed engine Kubeflow users
already run, makes its node Pods and reports on the TrainJob's conditions, which this module reads back as a
ClientRound's outcome. A cluster without Trainer's CRDs, or an install without the runtime, is a condition
on the FederatedClient and a refused round, never a crash.
"""

from __future__ import annotations

import time
from typing import Any

from kubernetes.client.exceptions import ApiException

from fedfm.operators import kube
from fedfm.operators.jobs import TRAIN_JOBS, TRAINER_GROUP, TRAINER_VERSION

# The ClusterTrainingRuntime multi-node fine-tunes run on (the chart's, named by --training-runtime); None:
# this install runs none.
_runtime: list[str] = []
CONDITION = "MultiNode"


def use_runtime(name: str | None) -> None:
    _runtime[:] = [name] if name else []


def runtime() -> str | None:
    return _runtime[0] if _runtime else None


_DISCOVERY_SECONDS = 10.0  # how long an answer of the API discovery holds: it is asked for every multi-node member
_discovered: dict[str, tuple[float, bool]] = {}


def installed() -> bool:
    """Whether the cluster serves TrainJobs (Trainer's CRDs are installed): API discovery, which every
    authenticated account may read (asked at most every few seconds)."""
    asked, answer = _discovered.get(TRAIN_JOBS, (float("-inf"), False))
    if time.monotonic() - asked < _DISCOVERY_SECONDS:
        return answer
    try:
        found = kube.custom().get_api_resources(TRAINER_GROUP, TRAINER_VERSION)
        answer = any(resource.name == TRAIN_JOBS for resource in found.resources or [])
    except ApiException as exc:
        if exc.status != 404:
            raise
        answer = False
    _discovered[TRAIN_JOBS] = (time.monotonic(), answer)
    return answer


def unavailable() -> tuple[str, str] | None:
    """Why a multi-node fine-tune cannot run in this cluster now (reason, message), or None."""
    if runtime() is None:
        return "MultiNodeDisabled", ("this FedFM install runs no multi-node fine-tunes: install Kubeflow Trainer and "
                                     "the chart with trainer.enabled, or set resources.nodes to 1")
    if not installed():
        return "TrainerNotInstalled", (f"the cluster serves no {TRAIN_JOBS}.{TRAINER_GROUP}/{TRAINER_VERSION}: "
                                       "Kubeflow Trainer (v2) must be installed for resources.nodes > 1")
    return None


def create(namespace: str, manifest: dict[str, Any]) -> None:
    kube.custom().create_namespaced_custom_object(TRAINER_GROUP, TRAINER_VERSION, namespace, TRAIN_JOBS, manifest)


def delete(namespace: str, name: str) -> None:
    """Delete the TrainJob (its Pods go with it); one that is gone, or a cluster without Trainer, is fine."""
    try:
        kube.custom().delete_namespaced_custom_object(TRAINER_GROUP, TRAINER_VERSION, namespace, TRAIN_JOBS, name,
                                                      propagation_policy="Background")
    except ApiException as exc:
        if exc.status != 404:
            raise


def outcome(train_job: dict) -> tuple[str, str, str] | None:
    """What a TrainJob's status says of its round, as :func:`fedfm.operators.jobs.job_outcome` says it of a Job:
    ("Complete" | "Failed" | "Running", reason, why), or None while no node runs yet. Trainer marks a finished
    TrainJob with a ``Complete`` or ``Failed`` condition (a Failed one with reason ``DeadlineExceeded`` ran past
    ``activeDeadlineSeconds``); why = its reason and message."""
    status = train_job.get("status") or {}
    for condition in status.get("conditions") or []:
        if condition.get("type") in ("Complete", "Failed") and condition.get("status") == "True":
            reason = condition.get("reason", "")
            return condition["type"], reason, ": ".join(part for part in (reason, condition.get("message")) if part)
    if any(job.get("active") for job in status.get("jobsStatus") or []):
        return "Running", "", ""
    return None
