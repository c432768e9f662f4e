"""The CustomResourceDefinitions of fedfm.dev/v1alpha1, generated here and committed to the chart.

``Federation.spec.config`` is the :class:`~fedfm.config.FederationConfig` schema itself, converted from
pydantic's JSON schema to a structural OpenAPI v3 schema, so the CLI config, the pipeline parameter
and the CRD cannot drift apart. Regenerate the YAML after changing the config or these schemas::

    python -m fedfm.operators.crds --write charts/fedfm/crds

(a test fails while the committed files differ from what this module generates).
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

import yaml

from fedfm.config import FederationConfig
from fedfm.operators.api import (CLIENT_ROUNDS, EVALUATE, EVICTED, FAILED, FEDERATED_CLIENTS, FEDERATIONS, GROUP,
                                 PENDING, QUARANTINED, READY, RUNNING, SECURE, SUCCEEDED, TIMED_OUT, TRAIN, TRAINING,
                                 VERSION)
from fedfm.trust.secure_round import CLIENT_PHASES

Schema = dict[str, Any]

_STRING = {"type": "string"}
_INTEGER = {"type": "integer"}
_NUMBER = {"type": "number"}
_TIME = {"type": "string", "format": "date-time"}
_FREE_FORM = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}


def _object(properties: dict[str, Schema], required: list[str] | None = None, **extra: Any) -> Schema:
    schema: Schema = {"type": "object", "properties": properties, **extra}
    if required:
        schema["required"] = required
    return schema


_CONDITIONS = {"type": "array", "items": _object({
    "type": _STRING, "status": {"type": "string", "enum": ["True", "False", "Unknown"]}, "reason": _STRING,
    "message": _STRING, "lastTransitionTime": _TIME}, required=["type", "status"])}

_LABEL_SELECTOR = _object({
    "matchLabels": {"type": "object", "additionalProperties": _STRING},
    "matchExpressions": {"type": "array", "items": _object({
        "key": _STRING, "operator": {"type": "string", "enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
        "values": {"type": "array", "items": _STRING}}, required=["key", "operator"])},
})

_OBJECT_REFERENCE = _object({"name": _STRING, "namespace": _STRING}, required=["name", "namespace"])


def structural(json_schema: Schema) -> Schema:
    """Pydantic's JSON schema as a Kubernetes structural schema: ``$ref`` inlined, ``X | None`` as
    ``nullable``, free-form dicts preserved, exclusive bounds in OpenAPI 3.0 form, no titles or defaults
    (pydantic applies the defaults when the operator reads the object)."""
    definitions = json_schema.get("$defs", {})

    def convert(node: Schema) -> Schema:
        if "$ref" in node:
            return convert(copy.deepcopy(definitions[node["$ref"].rsplit("/", 1)[-1]]) | {
                key: value for key, value in node.items() if key != "$ref"})
        if "anyOf" in node:
            options = [option for option in node["anyOf"] if option.get("type") != "null"]
            if len(options) != 1:
                raise ValueError(f"cannot express {node} structurally")
            rest = {key: value for key, value in node.items() if key != "anyOf"}
            return convert(options[0] | rest) | {"nullable": True}
        result: Schema = {}
        for key, value in node.items():
            if key in ("title", "default", "$defs"):
                continue
            if key == "properties":
                result[key] = {name: convert(child) for name, child in value.items()}
            elif key == "items":
                result[key] = convert(value)
            elif key == "additionalProperties":
                if value is False:
                    continue  # structural schemas prune unknown fields anyway
                if value is True or value == {}:
                    result["x-kubernetes-preserve-unknown-fields"] = True
                else:
                    result[key] = convert(value)
            elif key == "exclusiveMinimum":
                result["minimum"], result["exclusiveMinimum"] = value, True
            elif key == "exclusiveMaximum":
                result["maximum"], result["exclusiveMaximum"] = value, True
            elif key == "const":
                result["enum"] = [value]
            else:
                result[key] = value
        if result.get("type") == "object" and "properties" not in result:
            result["x-kubernetes-preserve-unknown-fields"] = True
            result.pop("additionalProperties", None)
        return result

    return convert({key: value for key, value in json_schema.items() if key != "$defs"})


def federation_config_schema() -> Schema:
    return structural(FederationConfig.model_json_schema())


def _crd(kind: str, plural: str, short_names: list[str], spec: Schema, status: Schema,
         columns: list[tuple[str, str, str]], description: str) -> dict:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}", "labels": {"app.kubernetes.io/part-of": "fedfm"}},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {"kind": kind, "listKind": f"{kind}List", "plural": plural, "singular": kind.lower(),
                      "shortNames": short_names, "categories": ["fedfm"]},
            "versions": [{
                "name": VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": [
                    {"name": name, "type": type_, "jsonPath": path} for name, type_, path in columns
                ] + [{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}],
                "schema": {"openAPIV3Schema": _object(
                    {"spec": spec, "status": status}, required=["spec"], description=description)},
            }],
        },
    }


def federation_crd() -> dict:
    spec = _object({
        "config": federation_config_schema() | {"description": "the federation config (FederationConfig)"},
        "clientSelector": _LABEL_SELECTOR | {
            "description": "which FederatedClients may join (by their labels); empty selects every client "
                           "that names this federation"},
    }, required=["config"])
    status = _object({
        "phase": _STRING,
        "currentRound": _INTEGER,
        "membersReady": _INTEGER,
        "members": {"type": "array", "items": _object({"name": _STRING, "namespace": _STRING, "phase": _STRING})},
        "lastAggregate": _object({"round": _INTEGER, "uri": _STRING, "sha256": _STRING, "samples": _INTEGER,
                                  "seconds": _NUMBER,
                                  "clients": {"type": "array", "items": _STRING},
                                  "missing": {"type": "object", "additionalProperties": _STRING},
                                  "privacy": _object({"epsilon": _NUMBER, "delta": _NUMBER, "noiseMultiplier": _NUMBER,
                                                      "clipNorm": _NUMBER}),
                                  "time": _TIME}),
        "lastFailure": _object({"round": _INTEGER, "runId": _STRING, "message": _STRING, "time": _TIME}),
        "lastCheckpoint": _object({"round": _INTEGER, "uri": _STRING, "runId": _STRING, "time": _TIME}),
        "lastEvaluation": _object({"round": _INTEGER, "metrics": {"type": "object", "additionalProperties": _NUMBER},
                                   "time": _TIME}),
        "observedAggregateTime": _TIME | {"description": "the lastAggregate the operator has counted in its metrics"},
        "signingKeys": {"type": "object", "additionalProperties": _STRING,
                        "description": "each member's spec.signingKey, relayed by the operator: what the pipeline "
                                       "verifies the members' secure-aggregation messages with"},
        "conditions": _CONDITIONS,
    })
    return _crd("Federation", FEDERATIONS, ["fed"], spec, status,
                [("Phase", "string", ".status.phase"), ("Round", "integer", ".status.currentRound"),
                 ("Ready", "integer", ".status.membersReady")],
                "A federated fine-tune in the platform namespace: its config and who may join.")


def _storage_location(uri: str, credentials: str, description: str) -> Schema:
    """A tenant's storage: a PersistentVolumeClaim path or a URI, with an optional Secret of credentials."""
    return _object({
        "pvc": _object({"claimName": _STRING, "path": _STRING}, required=["claimName", "path"]),
        "uri": _STRING | {"description": uri},
        "secretRef": _object({"name": _STRING}, required=["name"],
                             description="a Secret in this namespace whose keys become the Job's environment "
                                         f"({credentials})"),
    }, oneOf=[{"required": ["pvc"]}, {"required": ["uri"]}], description=description)


def federated_client_crd() -> dict:
    data = _storage_location(
        "fsspec URI of the training data (file, s3, gs, ...)", "storage credentials",
        "where the tenant's data is: a PersistentVolumeClaim path (mounted read-only) or a URI")
    state = _storage_location(
        "fsspec URI of storage only this tenant can read and write",
        "the state storage's credentials; they win over data.secretRef's",
        "where the tenant keeps what it never sends (secure aggregation's keys and plain update, FedSA-LoRA's "
        "lora_B, compression's residual): a PersistentVolumeClaim path (mounted read-write at /state) or a URI. "
        "The federation config cannot choose it.")
    model_policy = _object({
        "allowedModels": {"type": "array", "items": _STRING,
                          "description": "models this tenant's Jobs may load: a model id or glob (any revision), or "
                                         "ID@REVISION (that revision only); unset allows any model"},
        "allowRemoteCode": {"type": "boolean", "description": "whether a model's own code (trust_remote_code) may "
                                                              "run next to this tenant's data (default false)"},
    }, description="which code the federation may run next to this tenant's data and Secrets; a round that "
                   "breaks it is refused before its Job exists")
    quantity = {"x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}]}
    resources = _object({
        "cpu": quantity, "memory": quantity,
        "gpus": _INTEGER | {"minimum": 0, "description": "nvidia.com/gpu per Pod (per node); DeepSpeed runs one "
                                                        "process each"},
        "processes": _INTEGER | {"minimum": 1, "description": "DeepSpeed processes per Pod when there are no GPUs"},
        "nodes": _INTEGER | {"minimum": 1, "description": (
            "nodes the client's fine-tune spans, each a Pod with the resources above: more than 1 runs it as a "
            "Kubeflow Trainer TrainJob (the chart's trainer.enabled; Trainer installed in the cluster) whose "
            "DeepSpeed processes, nodes × gpus (or processes), train as one data-parallel group")},
        "nodeSelector": {"type": "object", "additionalProperties": _STRING},
        "tolerations": {"type": "array", "items": _FREE_FORM},
    })
    spec = _object({
        "federationRef": _OBJECT_REFERENCE,
        "data": data,
        "state": state,
        "modelPolicy": model_policy,
        "resources": resources,
        "env": {"type": "array", "description": "environment variables for the tenant's Jobs (a proxy, "
                "HF_HUB_OFFLINE, OMP_NUM_THREADS, ...); FedFM's own (FEDFM_CONFIG, HOME, PYTHONUNBUFFERED) are not "
                "replaced, and OMP_NUM_THREADS given here wins over the one resources.cpu implies",
                "items": _object({"name": _STRING | {"minLength": 1}, "value": _STRING}, required=["name", "value"])},
        "image": _STRING | {"description": "the FedFM image the tenant's Jobs run"},
        "serviceAccountName": _STRING,
        "signingKey": _STRING | {
            "pattern": "^[0-9a-f]{64}$",
            "description": "the public half (hex Ed25519) of the tenant's signing key, whose private half `fedfm "
                           "keygen` wrote into the tenant's state: what every secure-aggregation message of the "
                           "tenant is verified with"},
        "federationStorage": _object({
            "secretRef": _object({"name": _STRING}, required=["name"], description=(
                "a Secret in this namespace with the tenant's own key to the federation's storage "
                "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY; optionally AWS_ENDPOINT_URL, AWS_DEFAULT_REGION, "
                "AWS_SESSION_TOKEN)")),
        }, required=["secretRef"], description=(
            "the tenant's credential to the federation's storage, made by the platform admin and allowed only "
            "what `fedfm storage-policy` prints for this client: read the published adapters, read and write its "
            "own prefix. The Jobs use it for the federation's objects only, and it is required when that storage "
            "is remote: no tenant holds the platform's credential")),
    }, required=["federationRef", "data", "image"])
    status = _object({
        "phase": {"type": "string", "enum": [PENDING, READY, TRAINING, QUARANTINED, EVICTED]},
        "lastHeartbeat": _TIME,
        "roundsCompleted": _INTEGER,
        "lastUpdate": _object({"round": _INTEGER, "norm": _NUMBER, "samples": _INTEGER}),
        "reason": _STRING,
        "conditions": _CONDITIONS,
    })
    return _crd("FederatedClient", FEDERATED_CLIENTS, ["fedclient"], spec, status,
                [("Federation", "string", ".spec.federationRef.name"), ("Phase", "string", ".status.phase"),
                 ("Rounds", "integer", ".status.roundsCompleted"), ("Heartbeat", "date", ".status.lastHeartbeat")],
                "A tenant's enrolment in a federation, in the tenant's namespace.")


def client_round_crd() -> dict:
    spec = _object({
        "federation": _OBJECT_REFERENCE,
        "client": _STRING | {"description": "the FederatedClient (in this namespace) that does the work"},
        "round": _INTEGER | {"minimum": 0},
        "runId": _STRING,
        "purpose": {"type": "string", "enum": [TRAIN, EVALUATE, SECURE]},
        "secureStep": {"type": "string", "enum": list(CLIENT_PHASES),
                       "description": "with purpose SecureAggregation: which of the client's protocol steps"},
        "inputs": {"type": "object", "additionalProperties": _STRING,
                   "description": "a secure-aggregation step's inputs, by name (URIs and numbers)"},
        "globalAdapterURI": _STRING | {"description": "the adapter to start from (Train, Evaluate, and the secure "
                                                    "train step)"},
        "outputURI": _STRING | {"description": "where the Job writes the update (Train) or the evaluation counts"},
        "config": _FREE_FORM | {"description": "the federation config as this client needs it "
                                               "(FederationConfig with this client only)"},
        "deadlineSeconds": _NUMBER | {"minimum": 0, "exclusiveMinimum": True},
    }, required=["federation", "client", "round", "purpose", "outputURI", "config"])
    status = _object({
        "phase": {"type": "string", "enum": [PENDING, RUNNING, SUCCEEDED, FAILED, TIMED_OUT]},
        "jobName": _STRING,
        "jobKind": {"type": "string", "enum": ["Job", "TrainJob"],
                    "description": "what runs the round: a batch/v1 Job, or a Kubeflow Trainer TrainJob (multi-node)"},
        "startedAt": _TIME,
        "finishedAt": _TIME,
        "deadline": _TIME,
        "outputURI": _STRING,
        "sha256": _STRING,
        "samples": _INTEGER,
        "trainLoss": _NUMBER,
        "updateNorm": _NUMBER,
        "bytesDown": _INTEGER,
        "bytesUp": _INTEGER,
        "reason": _STRING,
        "message": _STRING,
        "storageError": _STRING | {"description": "the Job finished but its files cannot be read yet (retried)"},
        "conditions": _CONDITIONS,
    })
    return _crd("ClientRound", CLIENT_ROUNDS, ["cround"], spec, status,
                [("Client", "string", ".spec.client"), ("Round", "integer", ".spec.round"),
                 ("Purpose", "string", ".spec.purpose"), ("Phase", "string", ".status.phase")],
                "One client's fine-tune (or evaluation) in one round, in the tenant's namespace.")


def all_crds() -> dict[str, dict]:
    return {"federations": federation_crd(), "federatedclients": federated_client_crd(),
            "clientrounds": client_round_crd()}


class _PlainDumper(yaml.SafeDumper):
    """Writes a shared sub-schema out in full each time: no &anchors / *aliases in the manifests."""

    def ignore_aliases(self, data) -> bool:
        return True


def render(crd: dict) -> str:
    header = "# Generated by `python -m fedfm.operators.crds --write charts/fedfm/crds`; do not edit.\n"
    return header + yaml.dump(crd, Dumper=_PlainDumper, sort_keys=False, width=110)


def main() -> None:
    parser = argparse.ArgumentParser(description="Write the fedfm.dev CRDs as YAML.")
    parser.add_argument("--write", type=Path, required=True, help="directory (the chart's crds/)")
    args = parser.parse_args()
    args.write.mkdir(parents=True, exist_ok=True)
    for plural, crd in all_crds().items():
        (args.write / f"{plural}.{GROUP}.yaml").write_text(render(crd))
        print(f"wrote {args.write / f'{plural}.{GROUP}.yaml'}")


if __name__ == "__main__":
    main()
