"""Cluster mode for pipeline steps: each client's work is a ClientRound in the tenant's namespace.

The step publishes the adapter it starts from to the federation's storage, creates the ClientRound
(the operator turns it into a Job there, under the tenant's identity, on the tenant's data), waits for
the round's final phase, and takes the result back from storage. Only adapters, updates and
evaluation counts cross namespaces.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

from kubernetes.client.exceptions import ApiException

from fedfm import storage
from fedfm.adapters import AdapterMeta, header_of, public_copy
from fedfm.config import ClientConfig, ExecutionConfig, FederationConfig, PolicyConfig
from fedfm.errors import ConfigError, FedFMError
from fedfm.executors import ClientOutcome, Executor
from fedfm.operators import kube
from fedfm.operators.api import (API_VERSION, CLIENT_ROUNDS, EVALUATE, FAILED, FEDERATIONS, FINAL_PHASES, GROUP,
                                 LABEL_CLIENT, LABEL_FEDERATION, LABEL_PURPOSE, LABEL_ROUND, LABEL_RUN, SUCCEEDED,
                                 SECURE, TIMED_OUT, TRAIN, VERSION, client_round_name)
from fedfm.tasks import LossSums
from fedfm.trust import grants

# Beyond a round's deadline, how long a step waits for the operator to say so before it stops waiting.
_OPERATOR_GRACE_SECONDS = 120.0


class KubernetesExecutor(Executor):
    def __init__(self, cfg: FederationConfig, run_id: str):
        self.cfg = cfg
        self.run_id = run_id or "unnamed-run"
        self.run = hashlib.sha256(self.run_id.encode()).hexdigest()[:8]
        self.root = grants.federation_root(cfg.execution.storage_uri, cfg.name)
        self.federation_namespace = cfg.execution.federation_namespace or _own_namespace()

    # --- the Executor interface ------------------------------------------------------------------

    def train(self, cfg, client, round_index, global_uri, update_out):
        output = f"{self._folder(client, round_index)}/update.safetensors"
        key = self._create(client, round_index, TRAIN, self._publish(global_uri), output)
        status = self._wait({key: client})[client]
        if status.get("phase") != SUCCEEDED:
            return ClientOutcome(client, status.get("phase", TIMED_OUT), status.get("message", ""))
        data = storage.read_bytes(output)
        # only the update the operator checked and accepted (its content sha256 in the ClientRound's status):
        # one written over it since, by anyone who can write to the round's storage, is not this client's
        try:
            written = header_of(data).get("sha256")
        except ValueError:
            written = None
        if not written or written != status.get("sha256"):
            return ClientOutcome(client, FAILED, f"the update in storage (sha256 {written}) is not the one the "
                                                 f"operator accepted (sha256 {status.get('sha256')}): replaced after "
                                                 "it was checked; refused")
        storage.write_bytes(update_out, data, overwrite=True)
        return ClientOutcome(client)

    def evaluate(self, cfg, round_index, adapter_uri, clients):
        adapter = self._publish(adapter_uri)
        outputs, waiting = {}, {}
        for client in clients:
            outputs[client] = f"{self._folder(client, round_index)}/evaluation.json"
            waiting[self._create(client, round_index, EVALUATE, adapter, outputs[client])] = client
        sums, missing = {}, {}
        for client, status in self._wait(waiting).items():
            if status.get("phase") == SUCCEEDED:
                try:  # the tenant's answer: anything it sends is checked, and a bad one dropped with why
                    sums[client] = LossSums.parse(json.loads(storage.read_bytes(outputs[client])), client=client,
                                                  task=cfg.task)
                except (ValueError, RecursionError, FedFMError) as exc:
                    missing[client] = f"Failed: {exc}"
            else:
                missing[client] = f"{status.get('phase')}: {status.get('message', '')}"
        return sums, missing

    def secure_step(self, cfg, client, round_index, phase, inputs, output):
        return self.secure_steps(cfg, round_index, phase, {client: (inputs, output)})[client]

    def secure_steps(self, cfg, round_index, phase, requests):
        """Each step as a ClientRound (purpose SecureAggregation) in its tenant's namespace, all created before
        any is waited for: its file inputs are published to the client's prefix of the federation's storage,
        its message copied back to its output."""
        started = {}
        for client, (inputs, output) in requests.items():
            folder = f"{self._folder(client, round_index)}/secagg"
            published = {}
            for name, value in inputs.items():
                if name == "global":
                    published[name] = self._publish(value)
                elif isinstance(value, str) and storage.exists(value):
                    published[name] = f"{folder}/{phase}.{name}"
                    storage.write_bytes(published[name], storage.read_bytes(value), overwrite=True)
                else:
                    published[name] = str(value)  # a number (clip norm, noise)
            remote = f"{folder}/{phase}.out"
            key = self._create(client, round_index, SECURE, published.get("global", ""), remote,
                               secureStep=phase, inputs=published)
            started[key] = (client, remote, output)
        statuses = self._wait({key: client for key, (client, _, _) in started.items()})
        outcomes = {}
        for client, remote, output in started.values():
            status = statuses[client]
            if status.get("phase") != SUCCEEDED:
                outcomes[client] = ClientOutcome(client, status.get("phase", TIMED_OUT), status.get("message", ""))
                continue
            storage.write_bytes(output, storage.read_bytes(remote), overwrite=True)
            outcomes[client] = ClientOutcome(client)
        return outcomes

    def round_aggregated(self, cfg, meta: AdapterMeta, adapter_uri):
        aggregate = {
            "round": meta.round, "uri": self._publish(adapter_uri), "sha256": meta.sha256, "samples": meta.samples,
            "clients": sorted(meta.metrics.get("clients", {})), "missing": meta.metrics.get("missing", {}),
            "seconds": meta.metrics.get("round_seconds", 0.0), "time": kube.now()}
        spent = meta.metrics.get("privacy")
        if spent:  # the budget spent so far, for users and for the operator's fedfm_privacy_epsilon
            aggregate["privacy"] = {"epsilon": spent["epsilon"], "delta": spent["delta"],
                                    "noiseMultiplier": spent["noise_multiplier"], "clipNorm": spent["clip_norm"]}
        self._report({"lastAggregate": aggregate})

    def round_evaluated(self, cfg, round_index, global_metrics):
        figures = {key: float(value) for key, value in global_metrics.items()
                   if key in ("loss", "accuracy", "perplexity") and math.isfinite(value)}  # JSON has no NaN
        self._report({"lastEvaluation": {"round": round_index, "metrics": figures, "time": kube.now()}})

    def round_checkpointed(self, cfg, round_index, directory):
        self._report({"lastCheckpoint": {"round": round_index, "uri": directory.rsplit("/", 1)[0],
                                         "runId": self.run_id, "time": kube.now()}})

    def signing_keys(self, cfg):
        """The keys the operator relays from the tenants' FederatedClients (``status.signingKeys`` of the
        Federation): the pipeline never chooses a tenant's key."""
        federation = kube.get_federation(self.federation_namespace, cfg.name) or {}
        return dict((federation.get("status") or {}).get("signingKeys") or {})

    def round_failed(self, cfg, round_index, message):
        self._report({"lastFailure": {"round": round_index, "runId": self.run_id, "message": message,
                                      "time": kube.now()}})

    # --- helpers ---------------------------------------------------------------------------------

    def _folder(self, client: str, round_index: int) -> str:
        """Where ``client``'s inputs and outputs of a round are: under its own prefix, the only place its
        credential to the federation's storage may write (:mod:`fedfm.trust.grants`)."""
        return f"{grants.tenant_prefix(self.root, client)}/runs/{self.run}/round-{round_index}"

    def _publish(self, path: str) -> str:
        """The global adapter at ``path`` in the federation's storage, as tenants may see it (its header without
        the per-client figures: ``fedfm.adapters.public_copy``), named by its content (written once)."""
        data = public_copy(storage.read_bytes(path), where=f"global adapter {path}")
        uri = f"{grants.adapter_store(self.root)}/{hashlib.sha256(data).hexdigest()}.safetensors"
        if not storage.exists(uri):
            storage.write_bytes(uri, data, overwrite=True)  # same name, same bytes: a concurrent writer is harmless
        return uri

    def _client_config(self, client: str) -> dict:
        """The config a tenant's Job gets: this federation's, with this client as its only client (its LoRA
        rank kept). Where it keeps its own state is the tenant's to say: the operator puts its FederatedClient's
        ``spec.state`` in."""
        own = ClientConfig(name=client, lora_r=self.cfg.client(client).lora_r)
        return self.cfg.model_copy(update={
            "clients": [own], "policy": PolicyConfig(), "execution": ExecutionConfig(),
        }).as_dict()

    def _create(self, client: str, round_index: int, purpose: str, global_uri: str, output: str,
                **extra: object) -> tuple[str, str]:
        namespace = self.cfg.client(client).kubernetes_namespace
        name = client_round_name(self.cfg.name, self.run_id, round_index, purpose, client,
                                 str(extra.get("secureStep", "")))
        spec = {"federation": {"name": self.cfg.name, "namespace": self.federation_namespace}, "client": client,
                "round": round_index, "runId": self.run_id, "purpose": purpose, "outputURI": output,
                "config": self._client_config(client), **extra}
        if global_uri:  # a secure-aggregation step other than train has none
            spec["globalAdapterURI"] = global_uri
        if self.cfg.policy.round_deadline_seconds:
            spec["deadlineSeconds"] = self.cfg.policy.round_deadline_seconds
        body = {"apiVersion": API_VERSION, "kind": "ClientRound",
                "metadata": {"name": name, "namespace": namespace, "labels": {
                    LABEL_FEDERATION: self.cfg.name, LABEL_CLIENT: client, LABEL_ROUND: str(round_index),
                    LABEL_RUN: self.run, LABEL_PURPOSE: purpose.lower()}},
                "spec": spec}
        try:
            kube.custom().create_namespaced_custom_object(GROUP, VERSION, namespace, CLIENT_ROUNDS, body)
        except ApiException as exc:
            if exc.status != 409:  # 409: a retried step finds the ClientRound it created before
                raise
        return namespace, name

    def _wait(self, waiting: dict[tuple[str, str], str]) -> dict[str, dict]:
        """Poll until every ClientRound is final; ``{client: status}``."""
        deadline = self.cfg.policy.round_deadline_seconds
        give_up = time.time() + deadline + _OPERATOR_GRACE_SECONDS if deadline else None
        results: dict[str, dict] = {}
        while waiting:
            for key, client in list(waiting.items()):
                found = kube.get_client_round(*key)
                status = (found or {}).get("status") or {}
                if found is None:
                    results[client] = {"phase": "Failed", "message": f"ClientRound {key[0]}/{key[1]} was deleted"}
                elif status.get("phase") in FINAL_PHASES:
                    results[client] = status
                else:
                    continue
                del waiting[key]
            if waiting and give_up and time.time() > give_up:
                silent = f"the operator reported nothing {_OPERATOR_GRACE_SECONDS:g} s past the deadline"
                for client in waiting.values():
                    results[client] = {"phase": TIMED_OUT, "message": silent}
                break
            if waiting:
                time.sleep(self.cfg.execution.poll_seconds)
        return results

    def _report(self, status: dict) -> None:
        kube.patch_status(FEDERATIONS, self.federation_namespace, self.cfg.name, status)


def _own_namespace() -> str:
    try:
        return Path(kube.IN_CLUSTER_NAMESPACE).read_text().strip()
    except OSError:
        raise ConfigError("execution.federation_namespace is not set and this step is not running in a "
                          "cluster; name the Federation's namespace") from None
