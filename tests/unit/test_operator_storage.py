"""The operator on a storage that fails for a while, an admin lifting a quarantine (issue 17, finding 6: a
storage error once filed an honest tenant's update as invalid and quarantined the tenant for good), and the
global adapter as the cluster executor publishes it to the tenants (finding 7).

The handlers run here against an in-memory stand-in for the apiserver (the ClientRound they read and patch);
tests/cluster runs them for real."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from fedfm.adapters import AdapterMeta, save_adapter
from fedfm.errors import StorageError
from fedfm.operators import handlers, kube
from fedfm.operators.api import INVALID_UPDATE, QUARANTINED, READY, SUCCEEDED, TRAIN

FINGERPRINT = "sha256:" + "e" * 64
TENSORS = {"layer.lora_A.weight": torch.ones(2, 5), "layer.lora_B.weight": torch.zeros(5, 2)}


class Apiserver:
    """The ClientRounds, Federation and Events the handlers see."""

    def __init__(self, monkeypatch, client_round: dict, federation: dict):
        self.rounds = {client_round["metadata"]["name"]: client_round}
        self.federation, self.events = federation, []
        monkeypatch.setattr(kube, "get_client_round", lambda namespace, name: copy.deepcopy(self.rounds.get(name)))
        monkeypatch.setattr(kube, "patch_status", self.patch_status)
        monkeypatch.setattr(kube, "get_federation", lambda namespace, name: copy.deepcopy(self.federation))
        monkeypatch.setattr(kube, "list_objects", lambda plural, namespace=None, selector="": copy.deepcopy(
            list(self.rounds.values())))
        monkeypatch.setattr(handlers, "_event", lambda obj, normal, reason, message: self.events.append(reason))

    def patch_status(self, plural, namespace, name, status, resource_version=None):
        current = self.rounds[name].setdefault("status", {})
        for key, value in status.items():
            if value is None:
                current.pop(key, None)
            else:
                current[key] = value

    def round(self, name: str = "fed-r1-train-b") -> dict:
        return copy.deepcopy(self.rounds[name])


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    save_adapter(tmp_path / "global.safetensors", TENSORS,
                 AdapterMeta(kind="global", base_model=FINGERPRINT, peft_config={"r": 2}, round=0))
    save_adapter(tmp_path / "b.safetensors", {name: value + 0.5 for name, value in TENSORS.items()},
                 AdapterMeta(kind="update", base_model=FINGERPRINT, peft_config={"r": 2}, round=1, samples=90,
                             client="b"))
    client_round = {"metadata": {"name": "fed-r1-train-b", "namespace": "tenant-b", "uid": "u1",
                                 "resourceVersion": "1"},
                    "spec": {"federation": {"name": "fed", "namespace": "platform"}, "client": "b", "round": 1,
                             "purpose": TRAIN, "globalAdapterURI": str(tmp_path / "global.safetensors"),
                             "outputURI": str(tmp_path / "b.safetensors"), "config": {}},
                    "status": {"phase": "Running", "startedAt": kube.now()}}
    federation = {"metadata": {"name": "fed", "namespace": "platform", "annotations": {}},
                  "spec": {"config": {}, "clientSelector": {}}}
    return Apiserver(monkeypatch, client_round, federation)


def test_a_storage_outage_is_retried_and_never_quarantines_the_tenant(cluster, monkeypatch):
    honest_load = handlers.load_adapter

    def unavailable(uri, **kwargs):
        raise StorageError(f"cannot read {uri}: no credentials (the store's Secret was rotated)")

    monkeypatch.setattr(handlers, "load_adapter", unavailable)
    handlers._complete(cluster.round())
    handlers._complete(cluster.round())  # the Job's next event: the same outage, one Event
    status = cluster.round()["status"]
    assert status["phase"] == "Running" and "no credentials" in status["storageError"]
    assert cluster.events == ["StorageUnavailable"]

    monkeypatch.setattr(handlers, "load_adapter", honest_load)  # the storage answers again
    handlers.retry_storage(body=cluster.round())
    status = cluster.round()["status"]
    assert status["phase"] == SUCCEEDED and status["reason"] == "UpdateAccepted" and "storageError" not in status
    assert status["samples"] == 90 and cluster.events == ["StorageUnavailable", "UpdateAccepted"]


class Patch:
    def __init__(self):
        self.status: dict = {}


def _client_status(cluster) -> dict:
    patch = Patch()
    handlers.client_status(body={"metadata": {"name": "b", "namespace": "tenant-b"}},
                           spec={"federationRef": {"name": "fed", "namespace": "platform"}}, status={}, name="b",
                           namespace="tenant-b", labels={}, patch=patch)
    return patch.status


def test_an_admin_lifts_a_quarantine_on_the_federation_and_later_invalid_updates_count_again(cluster):
    bad = cluster.rounds["fed-r1-train-b"]
    bad["status"] = {"phase": "Failed", "reason": INVALID_UPDATE, "message": "client b's tensor has a NaN",
                     "finishedAt": "2026-12-05T01:00:00Z"}
    assert _client_status(cluster)["phase"] == QUARANTINED

    annotations = cluster.federation["metadata"]["annotations"]
    annotations[f"{handlers.QUARANTINE_LIFTED}b"] = "2026-12-05T02:00:00Z"
    assert _client_status(cluster)["phase"] == READY
    annotations[f"{handlers.QUARANTINE_LIFTED}a"] = "2026-12-05T02:00:00Z"  # another client's lift is not b's
    annotations[f"{handlers.QUARANTINE_LIFTED}b"] = "2026-12-05T00:30:00Z"  # before b's invalid update
    assert _client_status(cluster)["phase"] == QUARANTINED
    annotations[f"{handlers.QUARANTINE_LIFTED}b"] = "yesterday"  # not a time: lifts nothing
    assert _client_status(cluster)["phase"] == QUARANTINED


def test_the_global_adapter_tenants_receive_carries_no_other_tenants_figures(tmp_path):
    """Issue 17, finding 7: the global adapter's header once carried every client's samples, losses, norms and
    timings to every tenant. What the cluster executor publishes keeps only the round's aggregate figures."""
    from fedfm.adapters import load_adapter
    from fedfm.operators.executor import KubernetesExecutor

    record = {"clients": {"a": {"samples": 90, "train_loss": 0.4, "update_norm": 1.2, "started_at": 1.0},
                          "b": {"samples": 5000, "train_loss": 0.1, "update_norm": 0.7, "started_at": 2.0}},
              "missing": {"c": "TimedOut: no result within 30 s"}, "counted": ["a", "b"], "strategy": "fedavg",
              "clipped": {"b": 3.5}, "update_checks": {"norms": {"a": 1.2, "b": 0.7}}, "train_loss": 0.25,
              "round_seconds": 12.5, "aggregate_seconds": 0.5}
    sha256 = save_adapter(tmp_path / "global.safetensors", TENSORS,
                          AdapterMeta(kind="global", base_model=FINGERPRINT, peft_config={"r": 2}, round=1,
                                      samples=5090, metrics=record))
    executor = KubernetesExecutor.__new__(KubernetesExecutor)
    executor.root = str(tmp_path / "store")
    public = load_adapter(executor._publish(str(tmp_path / "global.safetensors")))
    assert public.meta.metrics == {"strategy": "fedavg", "train_loss": 0.25, "round_seconds": 12.5,
                                   "aggregate_seconds": 0.5, "clients_counted": 2}
    assert public.meta.sha256 == sha256 and public.meta.round == 1
    assert all(torch.equal(public.tensors[name], TENSORS[name]) for name in TENSORS)
    header = (tmp_path / "store").rglob("*.safetensors").__next__().read_bytes()[:4096]
    assert b"5000" not in header and b"TimedOut" not in header and b"update_norm" not in header


def test_a_published_adapter_replaced_after_publication_is_refused(tmp_path):
    """Issue 17, finding 1 (integrity): anyone who can write to the federation's storage could replace the
    published global adapter with a valid adapter of their own, and every tenant's Job (and the operator) would
    load it. The executor publishes it under its sha256; whoever loads it checks the bytes against the name."""
    from fedfm.adapters import load_adapter
    from fedfm.errors import AdapterError
    from fedfm.operators.executor import KubernetesExecutor

    meta = AdapterMeta(kind="global", base_model=FINGERPRINT, peft_config={"r": 2}, round=1, samples=10)
    save_adapter(tmp_path / "global.safetensors", TENSORS, meta)
    executor = KubernetesExecutor.__new__(KubernetesExecutor)
    executor.root = str(tmp_path / "store")
    published = executor._publish(str(tmp_path / "global.safetensors"))
    assert torch.equal(load_adapter(published).tensors["layer.lora_B.weight"], TENSORS["layer.lora_B.weight"])
    save_adapter(tmp_path / "theirs.safetensors", {**TENSORS, "layer.lora_B.weight": torch.full((5, 2), 9.0)}, meta)
    (tmp_path / "store").joinpath(*published.split("/store/")[1].split("/")).write_bytes(
        (tmp_path / "theirs.safetensors").read_bytes())
    with pytest.raises(AdapterError, match="does not hash to its name: it is not the adapter published under it"):
        load_adapter(published)


def test_the_aggregator_takes_only_the_update_the_operator_accepted(tmp_path, monkeypatch):
    """Issue 17, finding 1 (integrity): between the operator's checks of a tenant's update and the pipeline
    reading it, another tenant with write access to the round's storage could put its own update there (the
    ``client`` header is free text). The pipeline takes the update only if it is the one whose sha256 the
    operator recorded in the ClientRound's status."""
    from fedfm.config import FederationConfig
    from fedfm.operators.executor import KubernetesExecutor

    meta = AdapterMeta(kind="update", base_model=FINGERPRINT, peft_config={"r": 2}, round=1, samples=10)
    accepted = save_adapter(tmp_path / "accepted.safetensors", TENSORS, meta)
    executor = KubernetesExecutor.__new__(KubernetesExecutor)
    executor.cfg, executor.root, executor.run = FederationConfig.parse({"clients": 3}), str(tmp_path / "store"), "r1"
    monkeypatch.setattr(executor, "_publish", lambda uri: uri)
    monkeypatch.setattr(executor, "_create", lambda *args, **kwargs: ("tenant-a", "round"))
    monkeypatch.setattr(executor, "_wait", lambda waiting: {"tenant-0": {"phase": SUCCEEDED, "sha256": accepted}})
    output = Path(executor._folder("tenant-0", 1)) / "update.safetensors"
    output.parent.mkdir(parents=True)
    output.write_bytes((tmp_path / "accepted.safetensors").read_bytes())

    outcome = executor.train(executor.cfg, "tenant-0", 1, "global", str(tmp_path / "taken.safetensors"))
    assert outcome.succeeded and (tmp_path / "taken.safetensors").read_bytes() == output.read_bytes()
    save_adapter(output, {**TENSORS, "layer.lora_B.weight": torch.full((5, 2), 9.0)}, meta, overwrite=True)
    outcome = executor.train(executor.cfg, "tenant-0", 1, "global", str(tmp_path / "forged.safetensors"))
    assert not outcome.succeeded and not (tmp_path / "forged.safetensors").exists()
    assert "is not the one the operator accepted" in outcome.reason and accepted in outcome.reason
