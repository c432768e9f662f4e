"""In cluster mode the ε spent reaches the Federation's status (validated by the CRD's schema) and the
operator's ``fedfm_privacy_epsilon`` gauge."""

from __future__ import annotations

from prometheus_client import REGISTRY

from fedfm.adapters import AdapterMeta
from fedfm.config import FederationConfig


def test_the_epsilon_spent_goes_to_the_federation_status_and_the_gauge(monkeypatch, tmp_path):
    from fedfm.operators import executor as cluster
    from fedfm.operators import metrics
    from fedfm.operators.crds import federation_crd

    cfg = FederationConfig.parse({"name": "fed-dp", "data": {"labels": ["a", "b"]},
                                  "execution": {"mode": "kubernetes", "storage_uri": str(tmp_path),
                                                "federation_namespace": "platform"},
                                  "privacy": {"noise_multiplier": 1.0, "clip_norm": 0.5}})
    reports = []
    executor = cluster.KubernetesExecutor(cfg, "run-1")
    monkeypatch.setattr(executor, "_report", reports.append)
    monkeypatch.setattr(executor, "_publish", lambda path: "file:///adapters/x.safetensors")
    meta = AdapterMeta(kind="global", base_model="sha256:x", peft_config={}, round=3, samples=10, sha256="ab",
                       metrics={"clients": {}, "privacy": {"epsilon": 2.5, "delta": 1e-5, "noise_multiplier": 1.0,
                                                           "clip_norm": 0.5, "unclipped": 2}})
    executor.round_aggregated(cfg, meta, str(tmp_path / "g.safetensors"))
    privacy = reports[0]["lastAggregate"]["privacy"]
    assert privacy == {"epsilon": 2.5, "delta": 1e-5, "noiseMultiplier": 1.0, "clipNorm": 0.5}
    schema = federation_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert set(schema["properties"]["status"]["properties"]["lastAggregate"]["properties"]["privacy"]["properties"]) \
        == set(privacy)

    metrics.federation_observed("fed-dp", 3, {}, 0.0, None, privacy["epsilon"])
    assert REGISTRY.get_sample_value("fedfm_privacy_epsilon", {"federation": "fed-dp"}) == 2.5
    metrics.federation_deleted("fed-dp")
    assert REGISTRY.get_sample_value("fedfm_privacy_epsilon", {"federation": "fed-dp"}) is None
