"""Secure aggregation end to end in ``fedfm simulate``: real fine-tunes, masked updates, dropouts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedfm.adapters import load_adapter
from fedfm.errors import ConfigError, QuorumError, TrainingError

pytestmark = pytest.mark.slow


def _final(run) -> dict[str, torch.Tensor]:
    rounds = max(int(path.name.split("-")[1]) for path in (run.output / "work").glob("round-*"))
    return load_adapter(run.output / "work" / f"round-{rounds}" / "global_adapter.safetensors").tensors


def _dropping(monkeypatch, client: str, round_index: int) -> None:
    """``client`` crashes in its fine-tune of ``round_index``: after it shared its keys, before it masks."""
    from fedfm import training

    original = training.train_client

    def flaky(cfg, name, index, global_adapter, update_out):
        if name == client and index == round_index:
            raise TrainingError(f"client {name}: the node was preempted")
        return original(cfg, name, index, global_adapter, update_out)

    monkeypatch.setattr(training, "train_client", flaky)


def test_the_masked_sum_gives_fedavgs_adapter_and_the_server_sees_no_plain_update(tiny_config, tmp_path):
    from fedfm.simulation import simulate

    cfg = tiny_config(rounds=2, clients=3)
    plain = simulate(cfg, tmp_path / "plain")
    secure = simulate(cfg.with_overrides({"secure_aggregation.enabled": True}), tmp_path / "secure")
    for name, value in _final(plain).items():
        torch.testing.assert_close(_final(secure)[name], value, rtol=0, atol=1e-5)  # fixed point, 2^-24
    record = secure.history[1]
    assert record["samples"] == plain.history[1]["samples"]
    assert sorted(record["clients"]) == ["tenant-0", "tenant-1", "tenant-2"]
    assert all(figures["bytes_up"] > 0 for figures in record["clients"].values())

    work = secure.output / "work"
    assert not list(work.rglob("updates"))  # no plain update ever reaches the server's directory
    masked = sorted(work.glob("round-1/secagg/masked/*.safetensors"))
    assert [path.stem for path in masked] == ["tenant-0", "tenant-1", "tenant-2"]
    plain_updates = sorted((secure.output / "client-state").glob("*/secagg/round-0001/update.safetensors"))
    assert len(plain_updates) == 3  # they stay in each client's own state location


def test_a_client_that_drops_after_sharing_is_recovered_and_the_sum_is_the_survivors(tiny_config, tmp_path,
                                                                                     monkeypatch):
    from fedfm.simulation import simulate

    _dropping(monkeypatch, "tenant-2", 1)
    cfg = tiny_config(rounds=1, clients=4, **{"policy.min_clients": 3})
    plain = simulate(cfg, tmp_path / "plain")
    secure = simulate(cfg.with_overrides({"secure_aggregation.enabled": True, "secure_aggregation.threshold": 3}),
                      tmp_path / "secure")
    record = secure.history[1]
    assert sorted(record["clients"]) == ["tenant-0", "tenant-1", "tenant-3"]
    assert "the node was preempted" in record["missing"]["tenant-2"]
    for name, value in _final(plain).items():
        torch.testing.assert_close(_final(secure)[name], value, rtol=0, atol=1e-5)
    meta = load_adapter(secure.output / "work" / "round-1" / "global_adapter.safetensors").meta
    assert meta.metrics["secure_aggregation"]["dropped"] == ["tenant-2"]


def test_below_the_threshold_the_round_fails_and_no_aggregate_is_written(tiny_config, tmp_path, monkeypatch):
    from fedfm.simulation import simulate

    _dropping(monkeypatch, "tenant-1", 1)
    cfg = tiny_config(rounds=1, clients=3, **{"secure_aggregation.enabled": True,
                                              "secure_aggregation.threshold": 3})
    with pytest.raises(QuorumError, match="2 masked updates arrived, below the secure aggregation threshold of 3; "
                                          "no aggregate is produced"):
        simulate(cfg, tmp_path / "below")
    assert not (tmp_path / "below" / "work" / "round-1" / "global_adapter.safetensors").exists()


def test_differential_privacy_under_secure_aggregation_noises_on_the_clients(tiny_config, tmp_path):
    from fedfm.simulation import simulate

    cfg = tiny_config(rounds=2, clients=3, **{"secure_aggregation.enabled": True,
                                              "privacy.noise_multiplier": 0.5, "privacy.clip_norm": 0.5,
                                              "privacy.adaptive_clipping": {}})
    run = simulate(cfg, tmp_path / "dp")
    first, second = (record["privacy"] for record in run.history[1:])
    assert first["noise"] == "client" and 0 < first["epsilon"] < second["epsilon"]
    assert first["clip_norm"] == 0.5 and second["clip_norm"] == first["next_clip_norm"] != 0.5
    assert all(torch.isfinite(value).all() for value in _final(run).values())


def test_secure_aggregation_is_refused_where_it_cannot_run(tiny_config, tmp_path: Path):
    from fedfm.strategies import check_federation

    with pytest.raises(ConfigError, match="secure_aggregation gives the server only the round's mean update; "
                                          "strategy 'krum' needs each update"):
        check_federation(tiny_config(**{"secure_aggregation.enabled": True, "strategy.name": "krum"}))
    with pytest.raises(ConfigError, match="compression.method 'int8' cannot be combined with secure_aggregation"):
        tiny_config(**{"secure_aggregation.enabled": True, "compression.method": "int8"})
    with pytest.raises(ConfigError, match="needs at least 3 clients"):
        check_federation(tiny_config(clients=2, **{"secure_aggregation.enabled": True}))
