"""The batch/v1 Job a ClientRound becomes, in the tenant's namespace, under the tenant's identity."""

from __future__ import annotations

import json
from typing import Any

from fedfm.operators.api import (API_VERSION, EVALUATE, LABEL_CLIENT, LABEL_CLIENT_ROUND, LABEL_FEDERATION,
                                 LABEL_PURPOSE, LABEL_ROUND, SECURE, TRAIN)
from fedfm.operators.tenant import job_config, state_volume, storage_grant
from fedfm.storage import CREDENTIAL_DIRS_ENV
from fedfm.trust import grants
from fedfm.trust.signing import REGISTRY_ENV

DATA_MOUNT = "/data"
CONFIG_ENV = "FEDFM_CONFIG"
# The only writable path of the container (an emptyDir): the root filesystem is read-only, so HOME points
# here and the caches under it (Hugging Face's HF_HOME in the image, DeepSpeed's and Triton's) stay writable.
SCRATCH = "/tmp"


def processes_per_node(federated_client: dict) -> int:
    """DeepSpeed processes on each node (Pod): one per GPU asked for, else the processes asked for, else one."""
    resources = federated_client["spec"].get("resources") or {}
    return int(resources.get("gpus") or 0) or int(resources.get("processes") or 0) or 1


def nodes(federated_client: dict) -> int:
    """Nodes (Pods) a fine-tune of the client spans: more than one runs it as a Kubeflow Trainer TrainJob."""
    return int((federated_client["spec"].get("resources") or {}).get("nodes") or 1)


def world_size(federated_client: dict) -> int:
    """DeepSpeed processes of one fine-tune, on all its nodes."""
    return nodes(federated_client) * processes_per_node(federated_client)


def trains_on_nodes(client_round: dict, federated_client: dict) -> bool:
    """Whether the round's work is a fine-tune of a multi-node client: a TrainJob's, not a Job's. Its other
    work (evaluation, the protocol steps around the secure fine-tune) is light and runs in one Pod."""
    spec = client_round["spec"]
    trains = spec["purpose"] == TRAIN or (spec["purpose"] == SECURE and spec.get("secureStep") == "train")
    return trains and nodes(federated_client) > 1


def cpu_cores(quantity: int | float | str) -> float:
    """A Kubernetes CPU quantity (2, "1.5", "500m") in cores."""
    text = str(quantity).strip()
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def threads_per_process(federated_client: dict) -> int | None:
    """CPU threads for each of the Job's training processes when the tenant asked for a number of CPUs:
    torch otherwise starts one per core of the node, however few of them the Pod's limit lets it use."""
    cpu = (federated_client["spec"].get("resources") or {}).get("cpu")
    if cpu is None:
        return None
    try:
        cores = int(cpu_cores(cpu))
    except (ValueError, OverflowError):  # not a quantity ("lots", "inf"): the apiserver refuses the Job
        return None
    return max(1, cores // processes_per_node(federated_client))


def data_location(federated_client: dict) -> str:
    """What the Job's command reads: the PVC path where it is mounted, or the data URI."""
    data = federated_client["spec"]["data"]
    if "pvc" in data:
        return f"{DATA_MOUNT}/{data['pvc']['path'].lstrip('/')}"
    return data["uri"]


def command(client_round: dict, federated_client: dict) -> list[str]:
    spec = client_round["spec"]
    if spec["purpose"] == EVALUATE:
        args = ["client-evaluate", "--adapter", spec["globalAdapterURI"]]
    elif spec["purpose"] == SECURE:
        args = ["client-secagg", "--step", spec["secureStep"],
                *(part for name, value in sorted((spec.get("inputs") or {}).items())
                  for part in ("--input", f"{name}={value}"))]
        if spec["secureStep"] == "train":
            args += ["--world-size", str(world_size(federated_client))]
    else:
        args = ["client-train", "--global-adapter", spec["globalAdapterURI"],
                "--world-size", str(world_size(federated_client))]
    return ["fedfm", *args, "--client", spec["client"], "--round", str(spec["round"]),
            "--output", spec["outputURI"], "--data", data_location(federated_client)]


# A Pod stopped at its deadline (or deleted) gets this long before it is killed, not Kubernetes' 30 s: the
# client's outputs are single objects, written whole or not at all, so it has nothing to flush, and its
# process (PID 1, no SIGTERM handler) would only sit out the grace holding the node's CPUs and memory.
TERMINATION_GRACE_SECONDS = 5


def job_manifest(client_round: dict, federated_client: dict, signing_keys: dict[str, str] | None = None,
                 storage_root: str | None = None) -> dict[str, Any]:
    """The Job that does ``client_round``'s work with ``federated_client``'s image, data, resources and
    service account; owned by the ClientRound, so deleting the round deletes the Job. A secure-aggregation
    step also gets the federation's ``signing_keys`` (client → public key, from the FederatedClients), which
    it verifies its peers' messages with. ``storage_root``: where the federation's objects are, which the Job
    reaches with the tenant's own credential to them (``spec.federationStorage``), never the platform's."""
    labels, pod = _pod(client_round, federated_client, signing_keys, storage_root, secrets_as_files=False)
    job_spec: dict[str, Any] = {"backoffLimit": 0, "template": {"metadata": {"labels": labels}, "spec": pod}}
    deadline = _deadline(client_round)
    if deadline:
        job_spec["activeDeadlineSeconds"] = deadline
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": _owned(client_round, labels), "spec": job_spec}


def job_outcome(job: dict) -> tuple[str, str, str] | None:
    """What a Job's status says of its round: ("Complete" | "Failed" | "Running", reason, why), or None while its
    Pod does not run yet; a Failed one with reason ``DeadlineExceeded`` ran past ``activeDeadlineSeconds``."""
    status = job.get("status") or {}
    failed = next((c for c in status.get("conditions") or [] if c.get("type") == "Failed"
                   and c.get("status") == "True"), {})
    if status.get("succeeded"):
        return "Complete", "", ""
    if status.get("failed") or failed:
        return "Failed", failed.get("reason", ""), failed.get("message") or failed.get("reason", "")
    if status.get("active"):
        return "Running", "", ""
    return None


# Kubeflow Trainer (v2): the TrainJob a multi-node client's fine-tune becomes.
TRAINER_GROUP, TRAINER_VERSION, TRAIN_JOBS = "trainer.kubeflow.org", "v1alpha1", "trainjobs"
# The runtime's replicated Job whose Pods train, and their training container: what Trainer's torch plugin
# configures (node rank, number of nodes, master address and port as PET_* variables) and what the
# TrainJob's ``trainer`` and ``runtimePatches`` fill in. The chart's ClusterTrainingRuntime has exactly these.
TRAINER_NODE = "node"
PATCH_MANAGER = "fedfm.dev/operator"
# Where a multi-node Pod finds the tenant's Secrets it would get through envFrom as a Job's: a TrainJob can
# patch volumes into its Pods but not envFrom, so each Secret is a read-only volume under here and the
# ``fedfm`` command exports its keys (fedfm.storage.credentials_from_files).
SECRET_ENV_MOUNT = "/var/run/fedfm/credentials"


def train_job_manifest(client_round: dict, federated_client: dict, runtime: str,
                       signing_keys: dict[str, str] | None = None, storage_root: str | None = None) -> dict[str, Any]:
    """The Kubeflow Trainer ``TrainJob`` of a multi-node client's fine-tune: ``nodes`` Pods of the training
    ``runtime`` (a ClusterTrainingRuntime the chart installs), each running the same command in the same image,
    under the same ServiceAccount, with the same data, resources per node and hardening as the Job of a
    one-node client (:func:`job_manifest`); owned by the ClientRound. Only global rank 0 (node 0's first
    process) writes what the round produces."""
    labels, pod = _pod(client_round, federated_client, signing_keys, storage_root, secrets_as_files=True)
    container = pod.pop("containers")[0]
    trainer = {"image": container["image"], "command": container["command"], "env": container["env"],
               "numNodes": nodes(federated_client), "numProcPerNode": processes_per_node(federated_client)}
    if container["resources"]:
        trainer["resourcesPerNode"] = container["resources"]
    pod.pop("restartPolicy")  # the runtime's (Never): a failed node fails the TrainJob, as a failed Pod a Job
    patch = {"name": TRAINER_NODE, "template": {"spec": {"template": {
        "metadata": {"labels": labels},
        "spec": {**pod, "containers": [{"name": TRAINER_NODE, "securityContext": container["securityContext"],
                                        "volumeMounts": container["volumeMounts"]}]}}}}}
    spec: dict[str, Any] = {
        "runtimeRef": {"apiGroup": TRAINER_GROUP, "kind": "ClusterTrainingRuntime", "name": runtime},
        "trainer": trainer,
        "runtimePatches": [{"manager": PATCH_MANAGER, "trainingRuntimeSpec": {"template": {
            "metadata": {"labels": labels}, "spec": {"replicatedJobs": [patch]}}}}],
    }
    deadline = _deadline(client_round)
    if deadline:
        spec["activeDeadlineSeconds"] = deadline
    return {"apiVersion": f"{TRAINER_GROUP}/{TRAINER_VERSION}", "kind": "TrainJob",
            "metadata": _owned(client_round, labels), "spec": spec}


def _pod(client_round: dict, federated_client: dict, signing_keys: dict[str, str] | None,
         storage_root: str | None, secrets_as_files: bool) -> tuple[dict[str, str], dict[str, Any]]:
    """The labels and the Pod spec of the round's work, whichever object runs it."""
    meta, spec = client_round["metadata"], client_round["spec"]
    client_spec = federated_client["spec"]
    labels = {
        LABEL_FEDERATION: spec["federation"]["name"],
        LABEL_CLIENT: spec["client"],
        LABEL_ROUND: str(spec["round"]),
        LABEL_PURPOSE: spec["purpose"].lower(),
        LABEL_CLIENT_ROUND: meta["name"],
    }
    # the round's config with the tenant's own state location in it, whatever the round's config said
    config = job_config(spec["config"], federated_client)
    container: dict[str, Any] = {
        "name": "fedfm",
        "image": client_spec["image"],
        "command": command(client_round, federated_client),
        "env": [{"name": CONFIG_ENV, "value": json.dumps(config, sort_keys=True)},
                {"name": "PYTHONUNBUFFERED", "value": "1"}, {"name": "HOME", "value": SCRATCH}],
        "resources": _resources(client_spec.get("resources") or {}),
        # the tenant's code runs with nothing it does not need: no root, no capabilities, no writes outside
        # the scratch, the runtime's default system-call filter
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                            "readOnlyRootFilesystem": True, "runAsNonRoot": True},
        "volumeMounts": [{"name": "scratch", "mountPath": SCRATCH}],
    }
    if signing_keys is not None:
        container["env"].append({"name": REGISTRY_ENV, "value": json.dumps(signing_keys, sort_keys=True)})
    if storage_root and storage_grant(federated_client):
        container["env"] += _storage_grant_env(storage_root, storage_grant(federated_client))
    # the tenant's own variables, but none of the above: the config the Job runs is the operator's
    own = {item["name"] for item in container["env"]} | {CREDENTIAL_DIRS_ENV}
    container["env"] += [{"name": item["name"], "value": str(item["value"])}
                         for item in client_spec.get("env") or [] if item["name"] not in own]
    threads = threads_per_process(federated_client)
    if threads is not None and not any(item["name"] == "OMP_NUM_THREADS" for item in container["env"]):
        container["env"].append({"name": "OMP_NUM_THREADS", "value": str(threads)})
    pod: dict[str, Any] = {"restartPolicy": "Never", "containers": [container],
                           "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
                           "volumes": [{"name": "scratch", "emptyDir": {}}],
                           "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS}
    data, state = client_spec["data"], client_spec.get("state") or {}
    # the tenant's Secrets: its data's credentials, then its state's (a key in both takes the state's value)
    secrets = list(dict.fromkeys(part["secretRef"]["name"] for part in (data, state) if "secretRef" in part))
    if secrets and not secrets_as_files:
        container["envFrom"] = [{"secretRef": {"name": name}} for name in secrets]
    elif secrets:
        directories = []
        for index, name in enumerate(secrets):
            volume, directory = f"env-{index}", f"{SECRET_ENV_MOUNT}/{index}"
            pod["volumes"].append({"name": volume, "secret": {"secretName": name}})
            container["volumeMounts"].append({"name": volume, "mountPath": directory, "readOnly": True})
            directories.append(directory)
        container["env"].append({"name": CREDENTIAL_DIRS_ENV, "value": ":".join(directories)})
    if "pvc" in data:
        container["volumeMounts"].append({"name": "data", "mountPath": DATA_MOUNT, "readOnly": True})
        pod["volumes"].append({"name": "data", "persistentVolumeClaim": {"claimName": data["pvc"]["claimName"],
                                                                         "readOnly": True}})
    state_pvc = state_volume(federated_client)
    if state_pvc:
        pod["volumes"].append(state_pvc[0])
        container["volumeMounts"].append(state_pvc[1])
    if client_spec.get("serviceAccountName"):
        pod["serviceAccountName"] = client_spec["serviceAccountName"]
    resources = client_spec.get("resources") or {}
    if resources.get("nodeSelector"):
        pod["nodeSelector"] = resources["nodeSelector"]
    if resources.get("tolerations"):
        pod["tolerations"] = resources["tolerations"]
    return labels, pod


def _deadline(client_round: dict) -> int | None:
    seconds = client_round["spec"].get("deadlineSeconds")
    return max(1, int(seconds)) if seconds else None


def _owned(client_round: dict, labels: dict[str, str]) -> dict[str, Any]:
    """Metadata of what runs the round: its name, its namespace, owned by it (deleting it deletes them)."""
    meta = client_round["metadata"]
    return {"name": meta["name"], "namespace": meta["namespace"], "labels": labels,
            "ownerReferences": [{"apiVersion": API_VERSION, "kind": "ClientRound", "name": meta["name"],
                                 "uid": meta["uid"], "controller": True, "blockOwnerDeletion": True}]}


def _storage_grant_env(root: str, secret: str) -> list[dict[str, Any]]:
    """The federation's storage location and the tenant's credential to it, from its Secret, under names of
    their own (``fedfm.trust.grants``): beside the tenant's own storage credentials, never mixed with them."""
    env: list[dict[str, Any]] = [{"name": grants.ROOT_ENV, "value": root}]
    for key, variable in grants.CREDENTIAL_ENV.items():
        env.append({"name": variable, "valueFrom": {"secretKeyRef": {
            "name": secret, "key": key, "optional": key not in grants.REQUIRED_KEYS}}})
    return env


def _resources(resources: dict) -> dict:
    requests = {key: str(resources[key]) for key in ("cpu", "memory") if resources.get(key) is not None}
    limits = dict(requests)
    if resources.get("gpus"):
        limits["nvidia.com/gpu"] = str(resources["gpus"])
    result = {}
    if requests:
        result["requests"] = requests
    if limits:
        result["limits"] = limits
    return result
