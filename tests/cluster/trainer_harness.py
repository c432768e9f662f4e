"""Kubeflow Trainer v2 for the test cluster: its CRDs, stripped for v1.20, and a controller that plays Trainer's.

Trainer's controller (and JobSet's, which it drives) are Go programs that cannot be built here. What a test
gets instead:

- :func:`trainer_crds`: the ``trainer.kubeflow.org/v1alpha1`` CRDs (TrainJob, TrainingRuntime,
  ClusterTrainingRuntime) read from ``../shared/vendor/kubeflow-trainer`` beside the repository (never copied
  into it), with what the v1.20 apiserver of the test cluster lacks stripped (see :func:`strip_for_v120`).
- :func:`install_trainer`: applies them to a cluster and waits until they are Established (idempotent).
- :func:`vendored_runtime`: one of the vendored ClusterTrainingRuntimes (``torch-distributed``,
  ``deepspeed-distributed``) as a dict, to apply.
- :class:`TrainerController`: a background thread that turns every TrainJob into the node Pods that
  Trainer + its torch plugin + JobSet + the Job controller would run, and keeps the TrainJob's status
  (``jobsStatus``, conditions ``Complete`` / ``Failed`` / ``Suspended``) as Trainer does. Conditions and
  reasons are Trainer's: ``Complete`` (``AllJobsCompleted``, JobSet's, which Trainer copies), ``Failed``
  (``FailedJobs``, JobSet's; ``DeadlineExceeded``; ``TrainingRuntimeNotSupported`` for a runtimeRef of
  another kind or apiGroup, transient), ``Suspended`` (``Suspended`` / ``Resumed``).

The ``trainer`` session fixture (conftest.py) yields a controller for all namespaces of the session's
cluster, not yet started: ``trainer.install()`` installs the CRDs and starts it (idempotent; a test may
first check what happens on a cluster without Trainer, as long as no earlier test of the session installed
it). The fixture stops the controller at the end (the CRDs stay). A test applies a runtime (e.g.
``plane.apply(vendored_runtime())``) and a TrainJob and waits on the TrainJob's conditions (:func:`finished`).
The Pods are ``{trainjob}-node-0-{i}``, labelled ``trainer.kubeflow.org/trainjob-name``. ``controller.sync()``
runs one pass synchronously; ``controller.errors`` lists what failed in its passes. The Pods get, in the
trainer container ``node``:
``PET_NNODES``, ``PET_NPROC_PER_NODE``, ``PET_NODE_RANK``, ``PET_MASTER_ADDR``, ``PET_MASTER_PORT`` (29400)
and ``JOB_COMPLETION_INDEX`` (= node rank, as an Indexed Job sets it).

Deviations from real Trainer, on purpose or because this cluster is what it is:

- No JobSet, no Job, no headless Service: the controller creates the Pods itself, named
  ``{trainjob}-node-0-{i}`` (what JobSet's Indexed Job would name them, without the random suffix), owned by
  the TrainJob (controller ownerReference, so the real garbage collector deletes them with it). Labels and
  annotations that runtime or patches put on the JobSet or on the replicated Jobs have nowhere to go and are
  not applied; only the Pod template's reach the Pods.
- ``PET_MASTER_ADDR``: real Trainer sets the DNS name ``{trainjob}-node-0-0.{trainjob}`` (the headless
  Service). This cluster has no DNS, so node 0 gets its own IP (downward API ``status.podIP``) and the other
  nodes are created only once node 0 has an IP, with that IP.
- Only the ``node`` (trainer) replicated job runs: initializer steps (dataset/model initializers) and other
  replicated jobs of the runtime are ignored, and so is ``spec.initializer``. Only the torch plugin's
  environment is set (the MPI plugin of ``deepspeed-distributed``, its launcher and SSH keys, are not played).
- ``numProcPerNode: auto`` is the trainer container's ``nvidia.com/gpu`` limit, else 1 (CPU).
- A runtimeRef naming a runtime that does not exist: ``Failed`` with reason ``TrainingRuntimeNotFound``, no
  Pods; transient: cleared, and the Pods made, once the runtime exists. Real Trainer (v2.3, as its code
  reads) sets no condition then: building the JobSet fails, it records an Event
  (``TrainJobResourcesCreationFailed``) and retries with backoff, so the TrainJob has no terminal condition
  until its deadline. Code under test must not rely on this condition to end a round.
- Condition messages: ``Failed``/``FailedJobs`` names the failed Pod and its container's exit code and
  reason ("jobset failed due to one or more job failures: pod X-node-0-1 failed: container node exited with
  code 1 (Error)"); JobSet's own message ends before the colon, so code under test must not parse the rest.
- ``activeDeadlineSeconds`` counts from the TrainJob's creation, or from its last resume (the ``Suspended``
  condition's transition to False), as Trainer's; at the deadline every node Pod is deleted at once (grace
  period 0; Trainer deletes the JobSet and the Pods terminate gracefully). On a failed Pod the still active
  Pods are deleted (JobSet's failure policy); finished ones stay, their logs being the evidence.
- ``schedulingGates`` in runtime patches are dropped (v1.20 Pods have no such field). No webhook: what
  Trainer's admission webhook and the CRDs' CEL rules would refuse (see :func:`strip_for_v120`) is accepted,
  e.g. ``PET_*`` variables in ``spec.trainer.env`` (here the torch plugin's values win) or a changed
  ``spec.trainer``. Runtime patches merge as Kubernetes' strategic merge would: objects deeply, lists of
  objects by ``name`` (``volumeMounts`` by ``mountPath``), ``tolerations`` and other lists replaced.
- Image pulls: the image is used as given and ``imagePullPolicy`` as the runtime sets it (unset: the
  apiserver's default, IfNotPresent for a non-``latest`` tag), as the operator's Jobs rely on: the test
  images are tagged by digest and loaded into the node's containerd.
"""

from __future__ import annotations

import copy
import datetime
import functools
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Iterable

import yaml
from kubernetes import client
from kubernetes.dynamic.exceptions import DynamicApiError

from kube import REPO, apply, load_manifests, resource_for, wait_crds_established

log = logging.getLogger("fedfm.tests.trainer")

VENDOR = Path(os.environ.get("FEDFM_TRAINER_VENDOR") or REPO.parent / "shared" / "vendor" / "kubeflow-trainer")
GROUP = "trainer.kubeflow.org"
API_VERSION = f"{GROUP}/v1alpha1"
TRAINJOB_NAME = f"{GROUP}/trainjob-name"           # label on every Pod of a TrainJob
ANCESTOR = f"{GROUP}/trainjob-ancestor-step"        # label on the runtime's replicated Job templates
TRAINER_STEP = "trainer"
TRAINER_CONTAINER = "node"
MASTER_PORT = 29400
RUNTIME_NOT_SUPPORTED = "TrainingRuntimeNotSupported"   # Trainer's reason (a kind/apiGroup it has no runtime for)
RUNTIME_NOT_FOUND = "TrainingRuntimeNotFound"           # the harness's (see the module's docstring)
TRANSIENT = (RUNTIME_NOT_SUPPORTED, RUNTIME_NOT_FOUND)
MANAGED_BY = f"{GROUP}/trainjob-controller"              # spec.managedBy's default
# Pod-level fields a runtime patch may set (the TrainJob CRD's schema of runtimePatches)
PATCHABLE_POD_FIELDS = ("serviceAccountName", "volumes", "securityContext", "nodeSelector", "tolerations",
                        "affinity", "imagePullSecrets", "terminationGracePeriodSeconds", "initContainers")
PATCHABLE_CONTAINER_FIELDS = ("env", "volumeMounts", "securityContext")
# the key of a list whose items are merged one by one (Kubernetes' strategic merge keys); lists not named
# here whose items have a `name` merge by name, every other list is replaced
MERGE_KEYS = {"volumeMounts": "mountPath", "tolerations": None, "args": None, "command": None}


# ------------------------------------------------------------------------------------------------ CRDs

def strip_for_v120(crd: dict) -> dict:
    """A copy of a vendored Trainer CRD that the v1.20 apiserver takes and stores as given. Stripped:

    - every ``x-kubernetes-validations`` (CEL rules: immutability of ``spec.trainer``/``runtimeRef``/
      ``activeDeadlineSeconds``..., ``numProcPerNode >= 1``, ``managedBy`` values, the TrainJob name being an
      RFC 1035 label of <= 63 characters). CEL validation came in v1.23; v1.20 does not know the field and
      silently drops it (verified: the CRD is accepted, the stored schema has none), so stripping it only
      makes what is applied equal what is stored. None of these rules is enforced on the test cluster.
    - every ``default: ""`` (the empty-string default of ``name`` in LocalObjectReference-like objects:
      ``secretRef``, ``configMapKeyRef``, ``imagePullSecrets[]``...). v1.20 refuses the CRD: "default:
      Invalid value: "null": in body must be of type string". Where such a field is a key of an
      ``x-kubernetes-list-type: map`` list (``imagePullSecrets[].name``), v1.20 requires the key to have a
      default or be required, so it becomes required instead: an item without ``name`` is refused here,
      where Trainer's cluster would store ``name: ""``.
    """
    crd = copy.deepcopy(crd)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            node.pop("x-kubernetes-validations", None)
            for key in node.get("x-kubernetes-list-map-keys", ()):
                items = node["items"]
                if (items.get("properties") or {}).get(key, {}).get("default") == "":
                    required = items.setdefault("required", [])
                    if key not in required:
                        required.append(key)
            if node.get("default") == "":
                del node["default"]
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for version in crd["spec"]["versions"]:
        walk(version.get("schema"))
    return crd


def trainer_crds(vendor: Path = VENDOR) -> list[dict]:
    """The vendored Trainer CRDs (TrainJob, TrainingRuntime, ClusterTrainingRuntime), stripped for v1.20."""
    return copy.deepcopy(_stripped_crds(str(vendor)))


@functools.lru_cache(maxsize=None)
def _stripped_crds(vendor: str) -> list[dict]:   # 1.8 MB of YAML: parsed once per process
    folder = Path(vendor) / "crds"
    if not folder.is_dir():
        raise FileNotFoundError(f"Kubeflow Trainer's CRDs are not at {folder} (../shared/vendor beside the clone)")
    text = "\n---\n".join(path.read_text() for path in sorted(folder.glob("*.yaml")))
    docs = [d for d in yaml.load_all(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
            if d and d.get("kind") == "CustomResourceDefinition"]
    return [strip_for_v120(d) for d in docs]


def vendored_runtime(name: str = "torch-distributed", vendor: Path = VENDOR) -> dict:
    """The vendored ClusterTrainingRuntime ``name`` (``torch-distributed`` or ``deepspeed-distributed``)."""
    for path in sorted((Path(vendor) / "runtimes").glob("*.yaml")):
        for doc in load_manifests(path):
            if doc.get("kind") == "ClusterTrainingRuntime" and doc["metadata"]["name"] == name:
                return doc
    raise KeyError(f"no ClusterTrainingRuntime {name} in {vendor}/runtimes")


def install_trainer(plane_or_api, vendor: Path = VENDOR, timeout: float = 30.0) -> list[str]:
    """Apply Trainer's CRDs (stripped) to a cluster (a ControlPlane or an ApiClient) and wait until they are
    Established; idempotent. Returns the CRDs' names."""
    api = getattr(plane_or_api, "admin", plane_or_api)
    crds = trainer_crds(vendor)
    for crd in crds:
        apply(api, crd)
    names = [crd["metadata"]["name"] for crd in crds]
    wait_crds_established(api, names, timeout)
    return names


# ------------------------------------------------------------------------------------------- merging

def _merge(base: Any, patch: Any, key: str | None = None) -> Any:
    """``patch`` over ``base``: dicts deeply, lists of objects by their merge key (``name`` unless
    MERGE_KEYS says otherwise), other values and lists replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            out[k] = _merge(out[k], v, k) if k in out else copy.deepcopy(v)
        return out
    if isinstance(base, list) and isinstance(patch, list):
        merge_key = MERGE_KEYS.get(key or "", "name")
        if merge_key and all(isinstance(i, dict) and merge_key in i for i in base + patch):
            out = [copy.deepcopy(i) for i in base]
            for item in patch:
                at = next((n for n, i in enumerate(out) if i[merge_key] == item[merge_key]), None)
                if at is None:
                    out.append(copy.deepcopy(item))
                else:
                    out[at] = _merge(out[at], item)
            return out
    return copy.deepcopy(patch)


def _merge_env(base: list[dict], override: Iterable[dict]) -> list[dict]:
    """Environment lists merged by name, ``override`` winning (in place, else appended)."""
    out = [copy.deepcopy(e) for e in base]
    for var in override:
        at = next((n for n, e in enumerate(out) if e["name"] == var["name"]), None)
        if at is None:
            out.append(copy.deepcopy(var))
        else:
            out[at] = copy.deepcopy(var)
    return out


def trainer_step(runtime: dict) -> dict:
    """The runtime's replicated job of the trainer step (its Job template labelled
    ``trainer.kubeflow.org/trainjob-ancestor-step: trainer``); KeyError if it has none."""
    for rjob in ((runtime.get("spec") or {}).get("template") or {}).get("spec", {}).get("replicatedJobs") or []:
        labels = ((rjob.get("template") or {}).get("metadata") or {}).get("labels") or {}
        if labels.get(ANCESTOR) == TRAINER_STEP:
            return rjob
    raise KeyError(f"runtime {runtime['metadata']['name']} has no replicated job labelled {ANCESTOR}: trainer")


def node_counts(trainjob: dict, runtime: dict) -> tuple[int, int]:
    """(numNodes, numProcPerNode) of a TrainJob: its ``spec.trainer`` values, else the runtime's mlPolicy
    (``numNodes``, ``torch.numProcPerNode``), else 1; ``auto`` is the trainer's GPU count, else 1."""
    trainer = (trainjob.get("spec") or {}).get("trainer") or {}
    policy = (runtime.get("spec") or {}).get("mlPolicy") or {}
    nodes = trainer.get("numNodes") or policy.get("numNodes") or 1
    procs = trainer.get("numProcPerNode") or (policy.get("torch") or {}).get("numProcPerNode") or 1
    if isinstance(procs, str):
        if procs == "auto":
            limits = ((trainer.get("resourcesPerNode") or {}).get("limits") or {})
            procs = int(limits.get("nvidia.com/gpu") or 1)
        else:
            procs = int(procs)
    return int(nodes), int(procs)


def node_pod(trainjob: dict, runtime: dict, index: int, master_addr: str | None) -> dict:
    """The manifest of node Pod ``index`` of a TrainJob under ``runtime``: the trainer step's Pod template,
    the TrainJob's runtime patches, then its ``spec.trainer``, then the torch plugin's ``PET_*`` environment.
    ``master_addr`` None: the Pod's own IP (node 0)."""
    meta, spec = trainjob["metadata"], trainjob.get("spec") or {}
    name, namespace = meta["name"], meta["namespace"]
    rjob = trainer_step(runtime)
    pod_template = copy.deepcopy(((rjob.get("template") or {}).get("spec") or {}).get("template") or {})
    pod_meta = pod_template.get("metadata") or {}
    pod_spec = pod_template.get("spec") or {}

    for patch in spec.get("runtimePatches") or []:
        patch_spec = (((patch.get("trainingRuntimeSpec") or {}).get("template") or {}).get("spec") or {})
        for prj in patch_spec.get("replicatedJobs") or []:
            if prj.get("name") != rjob["name"]:
                continue
            ptemplate = ((prj.get("template") or {}).get("spec") or {}).get("template") or {}
            pmeta = ptemplate.get("metadata") or {}
            for field in ("labels", "annotations"):
                if pmeta.get(field):
                    pod_meta[field] = {**(pod_meta.get(field) or {}), **pmeta[field]}
            pspec = ptemplate.get("spec") or {}
            for field in PATCHABLE_POD_FIELDS:
                if field in pspec:
                    pod_spec[field] = _merge(pod_spec[field], pspec[field], field) if field in pod_spec \
                        else copy.deepcopy(pspec[field])
            for pcontainer in pspec.get("containers") or []:
                for container in pod_spec.get("containers") or []:
                    if container.get("name") != pcontainer.get("name"):
                        continue
                    for field in PATCHABLE_CONTAINER_FIELDS:
                        if field not in pcontainer:
                            continue
                        if field == "env":
                            container["env"] = _merge_env(container.get("env") or [], pcontainer["env"])
                        elif field in container:
                            container[field] = _merge(container[field], pcontainer[field], field)
                        else:
                            container[field] = copy.deepcopy(pcontainer[field])

    nodes, procs = node_counts(trainjob, runtime)
    trainer = spec.get("trainer") or {}
    containers = pod_spec.get("containers") or []
    node = next((c for c in containers if c.get("name") == TRAINER_CONTAINER), None)
    if node is None:
        raise KeyError(f"runtime {runtime['metadata']['name']}: the trainer step has no container "
                       f"{TRAINER_CONTAINER!r}")
    for field in ("image", "command", "args"):
        if trainer.get(field) is not None:
            node[field] = copy.deepcopy(trainer[field])
    if trainer.get("resourcesPerNode") is not None:
        node["resources"] = copy.deepcopy(trainer["resourcesPerNode"])
    master = ({"name": "PET_MASTER_ADDR", "value": master_addr} if master_addr else
              {"name": "PET_MASTER_ADDR", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}})
    pet = [{"name": "PET_NNODES", "value": str(nodes)}, {"name": "PET_NPROC_PER_NODE", "value": str(procs)},
           {"name": "PET_NODE_RANK", "value": str(index)}, master,
           {"name": "PET_MASTER_PORT", "value": str(MASTER_PORT)}]
    indexed = [{"name": "JOB_COMPLETION_INDEX", "value": str(index)}]   # what an Indexed Job sets
    node["env"] = _merge_env(_merge_env(node.get("env") or [], trainer.get("env") or []), indexed + pet)

    pod_spec.pop("schedulingGates", None)
    pod_spec.setdefault("restartPolicy", "Never")
    labels = {**(pod_meta.get("labels") or {}), TRAINJOB_NAME: name,
              "jobset.sigs.k8s.io/jobset-name": name, "jobset.sigs.k8s.io/replicatedjob-name": rjob["name"]}
    annotations = {**(pod_meta.get("annotations") or {}), "batch.kubernetes.io/job-completion-index": str(index)}
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": pod_name(name, index), "namespace": namespace, "labels": labels,
                     "annotations": annotations,
                     "ownerReferences": [{"apiVersion": API_VERSION, "kind": "TrainJob", "name": name,
                                          "uid": meta["uid"], "controller": True, "blockOwnerDeletion": True}]},
        "spec": pod_spec,
    }


def pod_name(trainjob: str, index: int) -> str:
    return f"{trainjob}-node-0-{index}"


# ------------------------------------------------------------------------------------------ controller

def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _timestamp(value: str) -> float:
    """Seconds since the epoch of a Kubernetes timestamp (RFC 3339, "Z" or an offset, as sanitized)."""
    stamp = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    return (stamp if stamp.tzinfo else stamp.replace(tzinfo=datetime.timezone.utc)).timestamp()


def _condition(status: dict, kind: str) -> dict | None:
    return next((c for c in status.get("conditions") or [] if c.get("type") == kind), None)


def finished(trainjob: dict, terminal: bool = False) -> str | None:
    """"Complete" or "Failed" where that condition is True, else None. ``terminal``: not a Failed whose
    reason is transient (a runtime not found or not supported: Trainer clears it once the runtime is there)."""
    status = trainjob.get("status") or {}
    for kind in ("Complete", "Failed"):
        cond = _condition(status, kind)
        if cond and cond.get("status") == "True" and not (terminal and cond.get("reason") in TRANSIENT):
            return kind
    return None


def _pod_failure(pod: dict) -> str:
    """Why a Failed Pod failed, in words (its containers' exit codes and reasons)."""
    name = pod["metadata"]["name"]
    status = pod.get("status") or {}
    for cs in status.get("containerStatuses") or []:
        term = (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get("terminated")
        if term and term.get("exitCode"):
            return (f"pod {name} failed: container {cs['name']} exited with code {term['exitCode']}"
                    f" ({term.get('reason') or 'no reason'})")
    return f"pod {name} failed: {status.get('reason') or 'Failed'} {status.get('message') or ''}".strip()


class TrainerController:
    """Plays Trainer v2's TrainJob controller (+ torch plugin, JobSet and Job controllers) for the TrainJobs
    of ``namespaces`` (None: all), polling every ``interval`` s in a background thread.

    Everything it needs is read back from the cluster at each pass (the TrainJob, its runtime, its Pods by
    name), so a restarted controller adopts the Pods of a running TrainJob instead of creating them again. Errors
    of a pass are logged and kept in ``errors`` (the latest 20); the next pass retries.
    """

    def __init__(self, plane_or_api, namespaces: Iterable[str] | None = None, interval: float = 0.5):
        self._plane_or_api = plane_or_api
        self.namespaces = list(namespaces) if namespaces is not None else None
        self.interval = interval
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._api: client.ApiClient | None = None

    # --- lifecycle -----------------------------------------------------------------------------------
    def install(self, vendor: Path = VENDOR) -> "TrainerController":
        """Kubeflow Trainer on the cluster: its CRDs (:func:`install_trainer`), then this controller started.
        Idempotent. (The ``trainer`` fixture yields the controller before this, so that a test may first see
        a cluster without Trainer.)"""
        install_trainer(self._plane_or_api, vendor)
        return self.start()

    @property
    def running(self) -> bool:
        return bool(self._thread and self._thread.is_alive())

    def start(self) -> "TrainerController":
        if self._thread and self._thread.is_alive():
            return self
        self._connect()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="trainer-controller", daemon=True)
        self._thread.start()
        return self

    def _connect(self) -> None:
        if self._api is not None:
            return
        # a client of its own: a thread of the test process shares nothing with the tests' clients
        plane = self._plane_or_api
        self._api = plane.api_client() if hasattr(plane, "api_client") else plane
        self._core = client.CoreV1Api(self._api)
        self._trainjobs = resource_for(self._api, API_VERSION, "TrainJob")

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self._api is not None and self._api is not self._plane_or_api:
            self._api.close()   # the client start() made; the next start() makes another
        self._api = None

    def __enter__(self) -> "TrainerController":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sync()
            except Exception as exc:  # noqa: BLE001  (a pass that fails is retried at the next)
                self._error(f"pass failed: {type(exc).__name__}: {exc}")
            self._stop.wait(self.interval)

    def _error(self, text: str) -> None:
        log.warning("trainer harness: %s", text)
        self.errors = (self.errors + [text])[-20:]

    # --- one pass ------------------------------------------------------------------------------------
    def _list_trainjobs(self) -> list[dict]:
        if self.namespaces is None:
            return self._trainjobs.get().to_dict().get("items") or []
        return [tj for ns in self.namespaces for tj in self._trainjobs.get(namespace=ns).to_dict().get("items") or []]

    def sync(self) -> None:
        """One pass over every TrainJob (what the background thread does every ``interval`` s)."""
        self._connect()
        for tj in self._list_trainjobs():
            try:
                self.reconcile(tj)
            except Exception as exc:  # noqa: BLE001
                self._error(f"TrainJob {tj['metadata']['namespace']}/{tj['metadata']['name']}: "
                            f"{type(exc).__name__}: {exc}")

    def _pods(self, trainjob: dict) -> dict[str, dict]:
        meta = trainjob["metadata"]
        pods = self._core.list_namespaced_pod(meta["namespace"], label_selector=f"{TRAINJOB_NAME}={meta['name']}")
        out = {}
        for pod in pods.items:
            pod = self._api.sanitize_for_serialization(pod)
            if any(ref.get("uid") == meta["uid"] for ref in pod["metadata"].get("ownerReferences") or []):
                out[pod["metadata"]["name"]] = pod
        return out

    def _runtime(self, trainjob: dict) -> dict | None:
        ref = (trainjob.get("spec") or {}).get("runtimeRef") or {}
        kind = ref.get("kind") or "ClusterTrainingRuntime"
        if (ref.get("apiGroup") or GROUP) != GROUP or kind not in ("ClusterTrainingRuntime", "TrainingRuntime"):
            return None
        res = resource_for(self._api, API_VERSION, kind)
        try:
            if kind == "TrainingRuntime":
                return res.get(name=ref.get("name"), namespace=trainjob["metadata"]["namespace"]).to_dict()
            return res.get(name=ref.get("name")).to_dict()
        except DynamicApiError as exc:
            if exc.status == 404:
                return None
            raise

    def _patch_status(self, trainjob: dict, status: dict) -> None:
        meta = trainjob["metadata"]
        self._trainjobs.status.patch(name=meta["name"], namespace=meta["namespace"], body={"status": status},
                                     content_type="application/merge-patch+json")
        trainjob.setdefault("status", {}).update(status)

    def _set_condition(self, trainjob: dict, kind: str, status: str, reason: str, message: str,
                       extra: dict | None = None) -> None:
        current = trainjob.get("status") or {}
        conditions = [dict(c) for c in current.get("conditions") or []]
        old = _condition(current, kind)
        new = {"type": kind, "status": status, "reason": reason, "message": message,
               "lastTransitionTime": old["lastTransitionTime"] if old and old.get("status") == status
               else _now()}
        if old == new and not extra:
            return
        conditions = [c for c in conditions if c.get("type") != kind] + [new]
        self._patch_status(trainjob, {"conditions": conditions, **(extra or {})})

    def _clear_condition(self, trainjob: dict, kind: str) -> None:
        conditions = [c for c in (trainjob.get("status") or {}).get("conditions") or [] if c.get("type") != kind]
        self._patch_status(trainjob, {"conditions": conditions})

    def _delete_pods(self, pods: Iterable[dict]) -> None:
        for pod in pods:
            if pod["metadata"].get("deletionTimestamp"):
                continue
            try:
                self._core.delete_namespaced_pod(pod["metadata"]["name"], pod["metadata"]["namespace"],
                                                 grace_period_seconds=0)
            except client.ApiException as exc:
                if exc.status != 404:
                    raise
            pod["metadata"]["deletionTimestamp"] = _now()   # no longer active in the jobsStatus written next

    def _jobs_status(self, name: str, pods: dict[str, dict], suspended: int = 0) -> list[dict]:
        counts = {"active": 0, "ready": 0, "succeeded": 0, "failed": 0}
        for pod in pods.values():
            status = pod.get("status") or {}
            phase = status.get("phase")
            if phase == "Succeeded":
                counts["succeeded"] += 1
            elif phase == "Failed":
                counts["failed"] += 1
            elif not pod["metadata"].get("deletionTimestamp"):
                counts["active"] += 1
                if any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or []):
                    counts["ready"] += 1
        return [{"name": name, **counts, "suspended": suspended}]

    def reconcile(self, tj: dict) -> None:
        """Bring one TrainJob a step forward: runtime, Pods, deadline, status."""
        meta, spec = tj["metadata"], tj.get("spec") or {}
        if meta.get("deletionTimestamp") or finished(tj, terminal=True):
            return   # a deleted TrainJob's Pods go with the garbage collector; a finished one stays as it is
        if spec.get("managedBy", MANAGED_BY) != MANAGED_BY:
            return   # another controller's (Kueue's MultiKueue), as Trainer skips it
        ref = spec.get("runtimeRef") or {}
        kind, group = ref.get("kind") or "ClusterTrainingRuntime", ref.get("apiGroup") or GROUP
        if group != GROUP or kind not in ("ClusterTrainingRuntime", "TrainingRuntime"):
            self._set_condition(tj, "Failed", "True", RUNTIME_NOT_SUPPORTED,
                                f"unsupported runtime: {kind}.{group}")
            return
        runtime = self._runtime(tj)
        if runtime is None:
            self._set_condition(tj, "Failed", "True", RUNTIME_NOT_FOUND,
                                f"{kind} {ref.get('name')} not found"
                                + (f" in namespace {meta['namespace']}" if kind == "TrainingRuntime" else ""))
            return
        if (_condition(tj.get("status") or {}, "Failed") or {}).get("reason") in TRANSIENT:
            self._clear_condition(tj, "Failed")   # the runtime came: as Trainer, the failure was transient
        rjob_name = trainer_step(runtime)["name"]
        pods = self._pods(tj)
        nodes, _ = node_counts(tj, runtime)

        if spec.get("suspend"):
            self._delete_pods(pods.values())
            self._set_condition(tj, "Suspended", "True", "Suspended", "TrainJob is suspended",
                                {"jobsStatus": self._jobs_status(rjob_name, {}, suspended=1)})
            return
        if (_condition(tj.get("status") or {}, "Suspended") or {}).get("status") == "True":
            self._set_condition(tj, "Suspended", "False", "Resumed", "TrainJob is resumed")

        # the deadline counts from the TrainJob's creation, or from its last resume (as Trainer's)
        resumed = _condition(tj.get("status") or {}, "Suspended")
        started = max(_timestamp(meta["creationTimestamp"]),
                      _timestamp(resumed["lastTransitionTime"]) if resumed else 0.0)
        deadline = spec.get("activeDeadlineSeconds")
        if deadline is not None and time.time() >= started + deadline:
            self._delete_pods(pods.values())
            self._set_condition(tj, "Failed", "True", "DeadlineExceeded",
                                f"TrainJob exceeded its active deadline ({deadline} s)",
                                {"jobsStatus": self._jobs_status(rjob_name, pods)})
            return

        failed = [p for p in pods.values() if (p.get("status") or {}).get("phase") == "Failed"]
        if failed:
            self._delete_pods(p for p in pods.values() if (p.get("status") or {}).get("phase")
                              not in ("Failed", "Succeeded"))
            message = "; ".join(_pod_failure(p) for p in sorted(failed, key=lambda p: p["metadata"]["name"]))
            self._set_condition(tj, "Failed", "True", "FailedJobs",
                                f"jobset failed due to one or more job failures: {message}",
                                {"jobsStatus": self._jobs_status(rjob_name, pods)})
            return
        names = [pod_name(meta["name"], i) for i in range(nodes)]
        if all((pods.get(n, {}).get("status") or {}).get("phase") == "Succeeded" for n in names):
            self._set_condition(tj, "Complete", "True", "AllJobsCompleted", "jobset completed successfully",
                                {"jobsStatus": self._jobs_status(rjob_name, pods)})
            return

        # create what is missing: node 0 first, the others once node 0 has an IP
        if names[0] not in pods:
            pods[names[0]] = self._create(node_pod(tj, runtime, 0, None))
        master_ip = (pods[names[0]].get("status") or {}).get("podIP")
        if master_ip:
            for index, name in enumerate(names[1:], start=1):
                if name not in pods:
                    pods[name] = self._create(node_pod(tj, runtime, index, master_ip))
        jobs_status = self._jobs_status(rjob_name, pods)
        if (tj.get("status") or {}).get("jobsStatus") != jobs_status:
            self._patch_status(tj, {"jobsStatus": jobs_status})

    def _create(self, pod: dict) -> dict:
        try:
            created = self._core.create_namespaced_pod(pod["metadata"]["namespace"], pod)
        except client.ApiException as exc:
            if exc.status != 409:
                raise
            created = self._core.read_namespaced_pod(pod["metadata"]["name"], pod["metadata"]["namespace"])
        return self._api.sanitize_for_serialization(created)
