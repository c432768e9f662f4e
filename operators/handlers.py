"""The FedFM operator's handlers (kopf).

- ``ClientRound`` → a Job in the tenant namespace (a Kubeflow Trainer TrainJob for a multi-node client's
  fine-tune, ``fedfm.operators.trainer``); its outcome → the round's final phase. A
  training round's update is validated (fingerprint, keys, shapes, finite) before it counts; a bad one
  fails the round with reason ``InvalidUpdate``, which quarantines the client. Deadlines are enforced.
- ``FederatedClient`` status is derived from its ClientRounds and its Federation every few seconds, by its
  Federation's timer for all its members at once: phase, rounds completed, last update, heartbeat.
- ``Federation`` status is derived from its members, its ClientRounds and what the pipeline reported
  (``status.lastAggregate`` / ``status.lastFailure``): phase, current round, members, conditions.

Everything the operator knows is in ``status`` and in the objects themselves, so a restarted operator
picks up where it was; Jobs have the ClientRound's name, so no round ever gets two.
"""

from __future__ import annotations

import copy
import json
import logging
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException

from fedfm import storage
from fedfm.adapters import load_adapter, validate_update
from fedfm.config import FederationConfig
from fedfm.errors import FedFMError, StorageError
from fedfm.operators import kube, metrics
from fedfm.operators.api import (CLIENT_ROUNDS, EVALUATE, EVICTED, FAILED, FEDERATED_CLIENTS, FEDERATIONS,
                                 FINAL_PHASES, GROUP, INVALID_UPDATE, LABEL_CLIENT, LABEL_CLIENT_ROUND,
                                 LABEL_FEDERATION, PENDING, QUARANTINED, READY, RUNNING, SUCCEEDED, TIMED_OUT,
                                 SECURE, TRAIN, TRAINING, VERSION, condition, set_condition)
from fedfm.operators import tenant, trainer
from fedfm.operators.jobs import TRAIN_JOBS, TRAINER_GROUP, TRAINER_VERSION, job_manifest, job_outcome, nodes, \
    train_job_manifest, trains_on_nodes
from fedfm.trust import grants
from fedfm.trust.secure_round import check_secure_output

JOB, TRAIN_JOB = "Job", "TrainJob"  # what runs a round (ClientRound status.jobKind)
STATUS_INTERVAL = 2.0  # seconds between derivations of a Federation's status and its members'
# A FederatedClient's own timer: its Federation's timer derives a member's status every STATUS_INTERVAL from one
# list of the federation's rounds; a timer per client as often would cost the apiserver two reads per client every
# 2 s (bench/scale.py: at 500 tenants, ClientRounds waited minutes for their Jobs behind them).
CLIENT_STATUS_INTERVAL = 30.0
DEADLINE_INTERVAL = 1.0
STORAGE_RETRY_INTERVAL = 5.0  # seconds between tries to read a finished round's files from a failing storage
# On a Federation, ``quarantine-lifted.fedfm.dev/CLIENT: TIME`` (RFC 3339) lifts CLIENT's quarantine: invalid
# updates it sent before TIME no longer count. The platform decides (the Federation lives in its namespace).
QUARANTINE_LIFTED = "quarantine-lifted.fedfm.dev/"
# The parts of a run's config that must equal the Federation's: a client trained on anything else
# would send an update that cannot be aggregated.
_MUST_MATCH = ("model", "task", "lora")


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)
    # Log lines become Events on the object only from WARNING up (a handler that failed); what users
    # must see is posted explicitly (_event), so routine handler chatter stays in the log.
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 60
    # Sync handlers run in a thread pool, each mostly waiting on the apiserver: kopf's default (CPUs + 4 threads)
    # queues a burst of ClientRounds behind a few (bench/scale.py, 200 rounds at once on 2 cores: p99 from create
    # to Job 9.2 s with 6 threads, 5.9 s with 32).
    settings.execution.max_workers = 32
    kube.api_client()  # fail at start, not in the first handler, when there are no credentials


def _failed_message(failure: dict[str, Any], checkpoint: dict[str, Any] | None) -> str:
    """Why the last round failed, and how to go on from the last checkpoint of that run."""
    message = failure.get("message", "")
    if checkpoint and checkpoint.get("runId") == failure.get("runId"):
        message += (f"; resume after round {checkpoint['round']}: start_round {checkpoint['round'] + 1} with "
                    f"execution.checkpoint_uri {checkpoint['uri']}")
    return message


def _event(obj: dict, normal: bool, reason: str, message: str) -> None:
    """An Event on ``obj`` for its users (kopf.event is not subject to posting.level, unlike kopf.info)."""
    kopf.event(obj, type="Normal" if normal else "Warning", reason=reason, message=message)


# --- ClientRound ---------------------------------------------------------------------------------


@kopf.on.resume(GROUP, VERSION, CLIENT_ROUNDS)
@kopf.on.create(GROUP, VERSION, CLIENT_ROUNDS)
def start_client_round(body: kopf.Body, spec: kopf.Spec, status: kopf.Status, name: str, namespace: str,
                       patch: kopf.Patch, **_: Any) -> None:
    """Admit the round and make sure its Job exists (creating it is idempotent: the Job has our name)."""
    if status.get("phase") in FINAL_PHASES:
        return
    client_round = copy.deepcopy(dict(body))
    federated_client = kube.get_federated_client(namespace, spec["client"])
    federation = kube.get_federation(spec["federation"]["namespace"], spec["federation"]["name"])
    root = _storage_root(federation)
    refusal = _refusal(spec, federated_client, federation, namespace) \
        or tenant.refusal(client_round, federated_client, root)
    if refusal:
        reason, message = refusal
        _finish(client_round, FAILED, reason, message)
        return
    keys = _signing_keys(_enrolled(spec["federation"]["name"], spec["federation"]["namespace"])) \
        if spec["purpose"] == SECURE else None
    kind = TRAIN_JOB if trains_on_nodes(client_round, federated_client) else JOB
    try:
        if kind == TRAIN_JOB:
            problem = trainer.unavailable()
            if problem:
                _finish(client_round, FAILED, *problem)
                return
            trainer.create(namespace, train_job_manifest(client_round, federated_client, trainer.runtime(), keys,
                                                         root))
        else:
            kube.batch().create_namespaced_job(namespace, job_manifest(client_round, federated_client, keys, root))
        _event(body, True, f"{kind}Created", f"{kind} {name} runs the {spec['purpose'].lower()} of round "
                                             f"{spec['round']} for client {spec['client']}")
    except ApiException as exc:
        if kind == TRAIN_JOB and exc.status == 404:  # Trainer's CRDs went away since the check
            _finish(client_round, FAILED, "TrainerNotInstalled",
                    f"the cluster serves no TrainJobs (Kubeflow Trainer's CRDs): {exc.reason}")
            return
        if exc.status != 409:  # 409: it exists already (an operator restart): adopt it
            raise
    started = status.get("startedAt") or kube.now()
    patch.status.update(jobName=name, jobKind=kind, startedAt=started, outputURI=spec["outputURI"])
    # Only a round without a phase gets one here, checked against the round as it is now (with its
    # resourceVersion): on resume ``status`` may be stale, and a Job event may have finished the round
    # meanwhile; a plain patch from the stale view would put a Succeeded round back to Pending for good.
    _advance(namespace, name, {"phase": PENDING}, from_phases=(None,))
    if spec.get("deadlineSeconds") and not status.get("deadline"):
        deadline = kube.parse_time(started).timestamp() + float(spec["deadlineSeconds"])
        patch.status["deadline"] = kube.iso(deadline)


def _enrolled(federation: str, namespace: str) -> list[dict]:
    """The FederatedClients that name the federation ``namespace``/``federation``."""
    return [c for c in kube.list_objects(FEDERATED_CLIENTS)
            if (c["spec"]["federationRef"]["name"], c["spec"]["federationRef"]["namespace"]) == (federation, namespace)]


def _signing_keys(enrolled: list[dict]) -> dict[str, str]:
    """Each member's registered public signing key (FederatedClient ``spec.signingKey``), by client name: what
    the members' secure-aggregation Jobs and the pipeline verify each other's messages with. The tenants
    register them; neither the pipeline nor the federation config can."""
    return {c["metadata"]["name"]: c["spec"]["signingKey"] for c in enrolled if c["spec"].get("signingKey")}


def _storage_root(federation: dict | None) -> str | None:
    """Where the federation's objects are (``execution.storage_uri``/NAME of its config), or None."""
    config = ((federation or {}).get("spec") or {}).get("config") or {}
    storage_uri = (config.get("execution") or {}).get("storage_uri")
    return grants.federation_root(storage_uri, config.get("name") or FederationConfig().name) if storage_uri else None


def _refusal(spec: dict, federated_client: dict | None, federation: dict | None,
             namespace: str) -> tuple[str, str] | None:
    """Why this round may not run at all, or None."""
    client = spec["client"]
    if federated_client is None:
        return "NotEnrolled", f"no FederatedClient {client!r} in namespace {namespace}: the tenant has not enrolled"
    phase = (federated_client.get("status") or {}).get("phase")
    if phase in (QUARANTINED, EVICTED):
        why = (federated_client.get("status") or {}).get("reason", "")
        return f"Client{phase}", f"client {client} is {phase.lower()}: {why}".rstrip(": ")
    reference = federated_client["spec"]["federationRef"]
    if (reference["name"], reference["namespace"]) != (spec["federation"]["name"], spec["federation"]["namespace"]):
        return "WrongFederation", (f"client {client} is enrolled in {reference['namespace']}/{reference['name']}, "
                                   f"not {spec['federation']['namespace']}/{spec['federation']['name']}")
    if federation is None:
        return "FederationNotFound", f"federation {spec['federation']['namespace']}/{spec['federation']['name']} " \
                                     "does not exist"
    wanted = federation["spec"].get("config", {})
    for key in _MUST_MATCH:
        if spec["config"].get(key) != wanted.get(key):
            return "ConfigMismatch", f"the run's config.{key} differs from the Federation's"
    return None


@kopf.on.event("batch", "v1", "jobs", labels={LABEL_CLIENT_ROUND: kopf.PRESENT})
def job_changed(body: kopf.Body, namespace: str, **_: Any) -> None:
    """Follow a round's Job: Running while its pod runs, then the round's final phase."""
    _follow(namespace, body["metadata"]["labels"][LABEL_CLIENT_ROUND], JOB, job_outcome(body))


@kopf.on.event(TRAINER_GROUP, TRAINER_VERSION, TRAIN_JOBS, labels={LABEL_CLIENT_ROUND: kopf.PRESENT})
def train_job_changed(body: kopf.Body, namespace: str, **_: Any) -> None:
    """Follow a multi-node round's TrainJob as a Job. (Without Trainer's CRDs kopf serves no TrainJobs and this
    never runs; it starts when they are installed.)"""
    _follow(namespace, body["metadata"]["labels"][LABEL_CLIENT_ROUND], TRAIN_JOB, trainer.outcome(body))


_FAILED = {JOB: "the Job's pod failed", TRAIN_JOB: "the TrainJob failed"}


def _follow(namespace: str, name: str, kind: str, outcome: tuple[str, str, str] | None) -> None:
    """What runs round ``name`` (a ``kind``) says ``outcome`` ((state, reason, why): :func:`job_outcome`,
    :func:`trainer.outcome`): Running while it runs, then the round's final phase."""
    client_round = kube.get_client_round(namespace, name)
    if outcome is None or client_round is None or (client_round.get("status") or {}).get("phase") in FINAL_PHASES:
        return
    state, reason, why = outcome
    if state == "Complete":
        _complete(client_round)
    elif state == "Failed" and reason == "DeadlineExceeded":
        # It carries the round's deadline (activeDeadlineSeconds), so its controller may stop it before our own
        # timer does: the same outcome either way.
        _finish(client_round, TIMED_OUT, "DeadlineExceeded", _deadline_message(client_round["spec"]))
    elif state == "Failed":
        _finish(client_round, FAILED, f"{kind}Failed", _FAILED[kind] + (f": {why}" if why else ""))
    else:
        _advance(namespace, name, {"phase": RUNNING}, from_phases=(None, PENDING))


@kopf.timer(GROUP, VERSION, CLIENT_ROUNDS, interval=DEADLINE_INTERVAL,
            when=lambda status, **_: status.get("phase") not in FINAL_PHASES and bool(status.get("deadline")))
def enforce_deadline(body: kopf.Body, spec: kopf.Spec, status: kopf.Status, **_: Any) -> None:
    if kube.seconds_since(status["deadline"]) < 0:
        return
    client_round = copy.deepcopy(dict(body))
    if _finish(client_round, TIMED_OUT, "DeadlineExceeded", _deadline_message(spec)):
        _stop(client_round)


def _deadline_message(spec: dict) -> str:
    return f"no result within the {float(spec['deadlineSeconds']):g} s deadline; the Job was stopped"


def _stop(client_round: dict) -> None:
    """Delete what runs the round (its Job, or its TrainJob and with it the node Pods)."""
    meta = client_round["metadata"]
    if (client_round.get("status") or {}).get("jobKind") == TRAIN_JOB:
        trainer.delete(meta["namespace"], meta["name"])
    else:
        kube.delete_job(meta["namespace"], meta["name"])


@kopf.on.delete(GROUP, VERSION, CLIENT_ROUNDS)
def client_round_deleted(body: kopf.Body, **_: Any) -> None:
    _stop(copy.deepcopy(dict(body)))


def _complete(client_round: dict) -> None:
    """The Job succeeded: check what it produced, then finish the round.

    The storage failing to answer (StorageError: no credentials, a timeout, an outage) says nothing about
    the tenant: the round is not finished but marked ``storageError``, and ``retry_storage`` tries again
    until the storage answers or the round's deadline passes. Only what the tenant wrote can make its
    update invalid (and the tenant quarantined)."""
    spec = client_round["spec"]
    try:
        if spec["purpose"] == EVALUATE:
            counts = json.loads(storage.read_bytes(spec["outputURI"]))
            _finish(client_round, SUCCEEDED, "Evaluated", f"{counts.get('examples', 0)} examples evaluated")
            return
        if spec["purpose"] == SECURE:  # what can be checked of a protocol message: that it is there and whose
            federated_client = kube.get_federated_client(client_round["metadata"]["namespace"], spec["client"]) or {}
            registry = {spec["client"]: federated_client.get("spec", {}).get("signingKey", "")}
            check_secure_output(spec["config"].get("name", FederationConfig.model_fields["name"].default),
                                spec["secureStep"], spec["outputURI"],
                                spec["client"], spec["round"], registry)
            _finish(client_round, SUCCEEDED, "SecureStepDone", f"secure aggregation step {spec['secureStep']} done",
                    bytesUp=storage.size(spec["outputURI"]))
            return
        reference = load_adapter(spec["globalAdapterURI"], who="the federation")
        # the update's size and encoded shapes checked against the global adapter before it is read: a tenant's
        # few bytes that decode to gigabytes would otherwise run the shared operator out of memory
        expected = {name: tuple(value.shape) for name, value in reference.tensors.items()}
        update = load_adapter(spec["outputURI"], who=f"client {spec['client']}", expected_shapes=expected)
        validate_update(update, reference, client=spec["client"], round_index=spec["round"])
    except StorageError as exc:
        meta = client_round["metadata"]
        if _advance(meta["namespace"], meta["name"], {"storageError": str(exc)}, from_phases=(None, PENDING, RUNNING)) \
                and (client_round.get("status") or {}).get("storageError") is None:
            _event(client_round, False, "StorageUnavailable", f"cannot read the round's files yet: {exc}")
        return
    except (FedFMError, ValueError) as exc:
        _finish(client_round, FAILED, INVALID_UPDATE, str(exc))
        return
    _finish(client_round, SUCCEEDED, "UpdateAccepted", f"update of {update.meta.samples} samples accepted",
            sha256=update.meta.sha256, samples=update.meta.samples,
            trainLoss=float(update.meta.metrics.get("train_loss", 0.0)),
            updateNorm=float(update.meta.metrics.get("update_norm", 0.0)),
            bytesDown=storage.size(spec["globalAdapterURI"]), bytesUp=storage.size(spec["outputURI"]))


@kopf.timer(GROUP, VERSION, CLIENT_ROUNDS, interval=STORAGE_RETRY_INTERVAL,
            when=lambda status, **_: status.get("phase") not in FINAL_PHASES and bool(status.get("storageError")))
def retry_storage(body: kopf.Body, **_: Any) -> None:
    """A round whose Job succeeded while the storage did not answer: check its output again."""
    _complete(copy.deepcopy(dict(body)))


def _finish(client_round: dict, phase: str, reason: str, message: str, **fields: Any) -> bool:
    """Put the round in its final phase (once), with an Event and the metrics; False if it already was."""
    meta, spec = client_round["metadata"], client_round["spec"]
    status = dict(phase=phase, reason=reason, message=message, finishedAt=kube.now(), storageError=None, **fields)
    if not _advance(meta["namespace"], meta["name"], status, from_phases=(None, PENDING, RUNNING)):
        return False  # another handler (a Job event, the deadline timer) finished the round first
    _event(client_round, phase == SUCCEEDED, reason, message)
    started = (client_round.get("status") or {}).get("startedAt")
    metrics.client_round_finished(spec["federation"]["name"], meta["namespace"], spec["purpose"], phase,
                                  kube.seconds_since(started) if started else None,
                                  fields.get("bytesDown", 0), fields.get("bytesUp", 0), fields.get("updateNorm"))
    return True


def _advance(namespace: str, name: str, status: dict, from_phases: tuple) -> bool:
    """Patch a ClientRound's status if its phase is still one of ``from_phases``; False if it is not (or
    the round is gone). The patch carries the resourceVersion it read, so two handlers racing on one
    round (a Job event and the deadline timer) cannot both move it."""
    for _ in range(5):
        current = kube.get_client_round(namespace, name)
        if current is None or (current.get("status") or {}).get("phase") not in from_phases:
            return False
        try:
            kube.patch_status(CLIENT_ROUNDS, namespace, name, status, current["metadata"]["resourceVersion"])
            return True
        except ApiException as exc:
            if exc.status != 409:
                raise
    raise kopf.TemporaryError(f"ClientRound {namespace}/{name} kept changing; retrying", delay=1)


# --- FederatedClient -----------------------------------------------------------------------------


def _before(finished: str | None, lifted: str) -> bool:
    """Whether a round that finished at ``finished`` is covered by a lift at ``lifted`` (both RFC 3339); a
    lift that is not a time lifts nothing."""
    try:
        return finished is not None and kube.parse_time(finished) <= kube.parse_time(lifted)
    except ValueError:
        return False


@kopf.on.resume(GROUP, VERSION, FEDERATED_CLIENTS)
@kopf.on.create(GROUP, VERSION, FEDERATED_CLIENTS)
@kopf.timer(GROUP, VERSION, FEDERATED_CLIENTS, interval=CLIENT_STATUS_INTERVAL)
def client_status(body: kopf.Body, spec: kopf.Spec, status: kopf.Status, name: str, namespace: str,
                  labels: kopf.Labels, patch: kopf.Patch, **_: Any) -> None:
    """Derive the client's status from its Federation and ClientRounds: when it appears, and now and then
    for a client whose Federation does not exist (yet). A member's status follows its rounds through its
    Federation's timer (:func:`federation_status`), which reads every member's rounds in one list."""
    reference = spec["federationRef"]
    rounds = kube.list_objects(CLIENT_ROUNDS, namespace, f"{LABEL_CLIENT}={name}")
    rounds = [r for r in rounds if r["spec"]["federation"]["name"] == reference["name"]]
    federation = kube.get_federation(reference["namespace"], reference["name"])
    new = _client_fields(dict(spec), dict(labels), dict(status), name, rounds, federation)
    changed = {key: value for key, value in new.items() if status.get(key) != value}
    if changed:
        patch.status.update(changed)
    _client_changed(body, name, namespace, reference["name"], new["phase"], new["reason"], "phase" in changed)


def _client_fields(spec: dict, labels: dict, status: dict, name: str, rounds: list[dict],
                   federation: dict | None) -> dict:
    """A FederatedClient's status from its Federation and its rounds (``rounds``: those of that federation)."""
    reference = spec["federationRef"]
    lifted = ((federation or {}).get("metadata", {}).get("annotations") or {}).get(f"{QUARANTINE_LIFTED}{name}")
    bad = [r for r in rounds if (r.get("status") or {}).get("reason") == INVALID_UPDATE
           and not (lifted and _before(r["status"].get("finishedAt"), lifted))]
    if bad:
        phase, reason = QUARANTINED, f"round {bad[-1]['spec']['round']}: {bad[-1]['status'].get('message', '')}"
    elif federation is None:
        phase, reason = PENDING, f"federation {reference['namespace']}/{reference['name']} does not exist"
    elif not kube.selector_matches(federation["spec"].get("clientSelector"), labels):
        phase, reason = EVICTED, f"federation {reference['name']}'s clientSelector does not select this client"
    elif any((r.get("status") or {}).get("phase") not in FINAL_PHASES for r in rounds):
        phase, reason = TRAINING, f"working on a round of {reference['namespace']}/{reference['name']}"
    else:
        phase, reason = READY, f"member of {reference['namespace']}/{reference['name']}"
    trained = sorted((r for r in rounds if r["spec"]["purpose"] == TRAIN
                      and (r.get("status") or {}).get("phase") == SUCCEEDED), key=lambda r: r["spec"]["round"])
    times = [t for r in rounds for t in ((r.get("status") or {}).get("startedAt"),
                                         (r.get("status") or {}).get("finishedAt")) if t]
    new = {"phase": phase, "reason": reason, "roundsCompleted": len(trained)}
    if trained:
        last = trained[-1]
        new["lastUpdate"] = {"round": last["spec"]["round"], "norm": last["status"].get("updateNorm", 0.0),
                             "samples": last["status"].get("samples", 0)}
    if times:
        new["lastHeartbeat"] = max(times)
    conditions = set_condition(status.get("conditions"), condition("Enrolled", phase in (READY, TRAINING), phase,
                                                                   reason, kube.now()))
    new["conditions"] = _multi_node_condition(conditions, {"spec": spec})
    return new


def _client_changed(body: dict, name: str, namespace: str, federation: str, phase: str, reason: str,
                    moved: bool) -> None:
    """What follows a client's status: an Event when its phase ``moved``, and the phase metric."""
    if moved:
        _event(body, phase in (READY, TRAINING), phase, reason)
    metrics.client_phase(namespace, name, federation, phase)


def _multi_node_condition(conditions: list[dict], federated_client: dict) -> list[dict]:
    """A multi-node client's ``MultiNode`` condition: whether its fine-tunes can run as TrainJobs here (Trainer
    installed, the chart's runtime named). A one-node client has none."""
    count = nodes(federated_client)
    if count == 1:
        return [c for c in conditions if c.get("type") != trainer.CONDITION]
    problem = trainer.unavailable()
    reason, message = problem or ("TrainJob", f"fine-tunes run as Kubeflow Trainer TrainJobs of {count} nodes on "
                                              f"the ClusterTrainingRuntime {trainer.runtime()}")
    return set_condition(conditions, condition(trainer.CONDITION, problem is None, reason, message, kube.now()))


@kopf.on.delete(GROUP, VERSION, FEDERATED_CLIENTS)
def client_withdrawn(name: str, namespace: str, spec: kopf.Spec, **_: Any) -> None:
    """A tenant that withdraws stops its unfinished rounds."""
    for client_round in kube.list_objects(CLIENT_ROUNDS, namespace, f"{LABEL_CLIENT}={name}"):
        if (client_round.get("status") or {}).get("phase") not in FINAL_PHASES:
            _finish(client_round, FAILED, "ClientWithdrew", f"FederatedClient {name} was deleted")
            _stop(client_round)
    metrics.client_phase(namespace, name, spec["federationRef"]["name"], None)


# --- Federation ----------------------------------------------------------------------------------


@kopf.on.resume(GROUP, VERSION, FEDERATIONS)
@kopf.on.create(GROUP, VERSION, FEDERATIONS)
@kopf.on.update(GROUP, VERSION, FEDERATIONS, field="spec")
@kopf.timer(GROUP, VERSION, FEDERATIONS, interval=STATUS_INTERVAL)
def federation_status(body: kopf.Body, spec: kopf.Spec, status: kopf.Status, name: str, namespace: str,
                      patch: kopf.Patch, **_: Any) -> None:
    """Derive the federation's status: config validity, members, rounds, and the last round's outcome."""
    now = kube.now()
    conditions = status.get("conditions")
    problem = _config_problem(spec, name)
    conditions = set_condition(conditions, condition("ConfigValid", problem is None, "Invalid" if problem else "Valid",
                                                     problem or "spec.config is a valid FederationConfig", now))
    enrolled = _enrolled(name, namespace)
    rounds = [r for r in kube.list_objects(CLIENT_ROUNDS, None, f"{LABEL_FEDERATION}={name}")
              if r["spec"]["federation"]["namespace"] == namespace]
    by_member: dict[tuple[str, str], list[dict]] = {}
    for r in rounds:
        by_member.setdefault((r["metadata"]["namespace"], (r["metadata"].get("labels") or {}).get(LABEL_CLIENT, "")),
                             []).append(r)
    members = [{"name": c["metadata"]["name"], "namespace": c["metadata"]["namespace"],
                "phase": _member_status(c, dict(body), by_member.get((c["metadata"]["namespace"],
                                                                      c["metadata"]["name"]), []))}
               for c in enrolled]
    ready = sum(member["phase"] in (READY, TRAINING) for member in members)
    running = any((r.get("status") or {}).get("phase") not in FINAL_PHASES for r in rounds)
    failure, aggregate = status.get("lastFailure") or {}, status.get("lastAggregate") or {}
    failed = bool(failure) and failure.get("time", "") >= aggregate.get("time", "")
    # The failed run may still have rounds in flight (steps that do not depend on the failed one);
    # only another run's rounds, created since, make the federation Running again.
    restarted = failed and any(r["spec"].get("runId") != failure.get("runId")
                               and r["metadata"]["creationTimestamp"] >= failure["time"] for r in rounds)
    conditions = set_condition(conditions, condition(
        "RoundFailed", failed, "BelowQuorum" if failed else "Aggregated",
        _failed_message(failure, status.get("lastCheckpoint")) if failed else
        (f"round {aggregate['round']} aggregated" if aggregate else "no round has failed"), now))
    phase = ("Invalid" if problem else "Failed" if failed and not restarted else "Running" if running
             else "Ready" if ready else "Waiting")
    new = {"phase": phase, "membersReady": ready, "members": members, "conditions": conditions,
           "currentRound": max([r["spec"]["round"] for r in rounds if r["spec"]["purpose"] == TRAIN], default=0),
           "signingKeys": _signing_keys(enrolled)}
    if aggregate and aggregate.get("time") != status.get("observedAggregateTime"):
        # Each aggregate the pipeline reports is counted once, across operator restarts too.
        if aggregate.get("seconds"):
            metrics.round_completed(name, float(aggregate["seconds"]))
        new["observedAggregateTime"] = aggregate.get("time")
    unfinished = [r["metadata"]["creationTimestamp"] for r in rounds
                  if (r.get("status") or {}).get("phase") not in FINAL_PHASES]
    policy = (spec.get("config") or {}).get("policy") or {}
    evaluation = (status.get("lastEvaluation") or {}).get("metrics", {})
    metrics.federation_observed(name, aggregate.get("round", 0), evaluation,
                                kube.seconds_since(min(unfinished)) if unfinished else 0.0,
                                policy.get("round_deadline_seconds"), (aggregate.get("privacy") or {}).get("epsilon"))
    changed = {key: value for key, value in new.items() if status.get(key) != value}
    if changed:
        patch.status.update(changed)
        if "phase" in changed and phase in ("Invalid", "Failed"):
            _event(body, False, phase, problem or failure.get("message", ""))


def _member_status(member: dict, federation: dict, rounds: list[dict]) -> str:
    """Derive a member's status from its Federation and its ``rounds`` of the federation (no read of its own),
    patch what changed; its phase."""
    meta, status = member["metadata"], member.get("status") or {}
    new = _client_fields(member["spec"], meta.get("labels") or {}, status, meta["name"], rounds, federation)
    changed = {key: value for key, value in new.items() if status.get(key) != value}
    if changed:
        try:
            kube.patch_status(FEDERATED_CLIENTS, meta["namespace"], meta["name"], changed)
        except ApiException as exc:
            if exc.status != 404:  # 404: it was just withdrawn
                raise
            return new["phase"]
    _client_changed(member, meta["name"], meta["namespace"], member["spec"]["federationRef"]["name"], new["phase"],
                    new["reason"], "phase" in changed)
    return new["phase"]


@kopf.on.delete(GROUP, VERSION, FEDERATIONS, optional=True)
def federation_deleted(name: str, **_: Any) -> None:
    metrics.federation_deleted(name)


def _config_problem(spec: dict, name: str) -> str | None:
    try:
        cfg = FederationConfig.parse(spec.get("config") or {}, source="spec.config")
    except FedFMError as exc:
        return str(exc)
    if cfg.name != name:
        return f"spec.config.name is {cfg.name!r}; it must be the Federation's name {name!r}"
    return None

