"""FedAvg and a round's aggregation: the math, streaming, and what a bad update does to a round."""

from __future__ import annotations

import gc
import hashlib
import weakref

import pytest
import torch

from fedfm.adapters import Adapter, AdapterMeta, load_adapter, save_adapter
from fedfm.config import FederationConfig, StrategyConfig
from fedfm.errors import AdapterError, AdapterValidationError, ConfigError, FedFMError, QuorumError
from fedfm.federation import aggregate_round
from fedfm.server_state import load_server_state
from fedfm.strategies import build_strategy
from fedfm.strategies.fedavg import FedAvg

FINGERPRINT = "sha256:" + "c" * 64
NAMES = ("layer.lora_A.weight", "layer.lora_B.weight", "head.bias")


def random_tensors(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"layer.lora_A.weight": torch.randn(2, 5, generator=generator),
            "layer.lora_B.weight": torch.randn(5, 2, generator=generator),
            "head.bias": torch.randn(3, generator=generator)}


def update(client: str, samples: int, seed: int, round_index: int = 1) -> Adapter:
    meta = AdapterMeta(kind="update", base_model=FINGERPRINT, peft_config={}, round=round_index, samples=samples,
                       client=client)
    return Adapter(tensors=random_tensors(seed), meta=meta)


def test_fedavg_equals_the_hand_computed_weighted_mean():
    global_tensors = random_tensors(100)
    updates = [update("a", 10, 1), update("b", 30, 2), update("c", 60, 3)]
    result = FedAvg().aggregate(global_tensors, iter(updates), state={})
    assert result.clients == ["a", "b", "c"]
    assert result.samples == 100
    for name in NAMES:
        a, b, c = (u.tensors[name].double() for u in updates)
        expected = global_tensors[name].double() + (10 * a + 30 * b + 60 * c) / 100
        # element by element, written out: this is the definition, not the implementation's formula
        assert torch.allclose(result.tensors[name].double(), expected, rtol=0, atol=1e-6)
        assert result.tensors[name].dtype == torch.float32


def test_fedavg_of_one_client_applies_its_update():
    global_tensors = random_tensors(7)
    only = update("solo", 5, 8)
    result = FedAvg().aggregate(global_tensors, iter([only]), state={})
    for name in NAMES:
        assert torch.allclose(result.tensors[name], global_tensors[name] + only.tensors[name], atol=1e-7)


def test_fedavg_streams_holding_one_update_at_a_time():
    """Each update can be freed as soon as the next is requested: memory does not grow with N."""
    alive: list[weakref.ref] = []
    most_alive = 0

    def stream(count: int):
        nonlocal most_alive
        for index in range(count):
            gc.collect()
            most_alive = max(most_alive, sum(ref() is not None for ref in alive))
            item = update(f"client-{index}", 1 + index, index)
            alive.append(weakref.ref(item))
            yield item

    FedAvg().aggregate(random_tensors(0), stream(10), state={})  # each gc.collect() walks torch's heap: 10, not 50
    assert most_alive <= 1


def test_fedavg_with_no_updates_is_an_error():
    with pytest.raises(Exception, match="no client updates"):
        FedAvg().aggregate(random_tensors(0), iter([]), state={})


def test_strategies_are_chosen_by_name_with_checked_parameters():
    assert isinstance(build_strategy(StrategyConfig(name="fedavg")), FedAvg)
    with pytest.raises(ConfigError, match="strategy.name 'fedsgd' is unknown; choose one of fedadagrad, fedadam, "):
        build_strategy(StrategyConfig(name="fedsgd"))
    with pytest.raises(ConfigError, match="takes no parameter momentum"):
        build_strategy(StrategyConfig(name="fedavg", params={"momentum": 0.9}))
    with pytest.raises(ConfigError, match="fedadam: eta and tau must be > 0"):
        build_strategy(StrategyConfig(name="fedadam", params={"eta": -1}))
    with pytest.raises(ConfigError, match="strategy 'fedavgm': bad parameters"):
        build_strategy(StrategyConfig(name="fedavgm", params={"server_momentum": "high"}))


class TestAggregateRound:
    """The aggregate step end to end on files: validate, combine, write; never touch what exists."""

    @pytest.fixture
    def setup(self, tmp_path):
        cfg = FederationConfig(clients=3)
        global_path = tmp_path / "global.safetensors"
        save_adapter(global_path, random_tensors(0),
                     AdapterMeta(kind="global", base_model=FINGERPRINT, peft_config={"r": 2}, round=0))
        paths = {}
        for index, client in enumerate(cfg.client_names):
            paths[client] = tmp_path / f"{client}.safetensors"
            good = update(client, 10 * (index + 1), index + 1)
            good.meta.metrics = {"train_loss": 1.0 + index, "seconds": 2.0, "bytes_down": 123}
            save_adapter(paths[client], good.tensors, good.meta)
        return cfg, global_path, paths

    def test_writes_the_fedavg_of_the_files(self, setup, tmp_path):
        cfg, global_path, paths = setup
        meta = aggregate_round(cfg, 1, str(global_path), [(c, str(p)) for c, p in paths.items()],
                               str(tmp_path / "next.safetensors"))
        result = load_adapter(tmp_path / "next.safetensors")
        assert result.meta.kind == "global" and result.meta.round == 1 and result.meta.samples == 60
        assert result.meta.base_model == FINGERPRINT and result.meta.peft_config == {"r": 2}
        start = load_adapter(global_path).tensors
        updates = [load_adapter(p) for p in paths.values()]
        for name in NAMES:
            expected = start[name].double() + sum(u.meta.samples * u.tensors[name].double() for u in updates) / 60
            assert torch.allclose(result.tensors[name].double(), expected, atol=1e-6)
        clients = meta.metrics["clients"]
        assert sorted(clients) == cfg.client_names
        assert clients["tenant-1"]["train_loss"] == 2.0
        assert clients["tenant-1"]["bytes_up"] == paths["tenant-1"].stat().st_size
        assert clients["tenant-1"]["bytes_down"] == 123

    @pytest.mark.parametrize("defect, message", [
        ("nan", r"client tenant-1's tensor head.bias has 1 non-finite value \(NaN/inf\)"),
        ("shape", r"client tenant-1's tensor layer.lora_A.weight has shape \(3, 5\); the global adapter's is \(2, 5\)"),
        ("missing", r"client tenant-1's update lacks tensor layer.lora_B.weight"),
        ("base", r"client tenant-1 trained on another base model"),
        ("corrupt", r"client tenant-1's adapter .* not a valid safetensors file"),
    ])
    def test_a_bad_update_fails_the_round_and_nothing_is_lost(self, setup, tmp_path, defect, message):
        cfg, global_path, paths = setup
        bad = update("tenant-1", 20, 2)
        if defect == "nan":
            bad.tensors["head.bias"][2] = float("nan")
        elif defect == "shape":
            bad.tensors["layer.lora_A.weight"] = torch.zeros(3, 5)
        elif defect == "missing":
            del bad.tensors["layer.lora_B.weight"]
        elif defect == "base":
            bad.meta.base_model = "sha256:" + "d" * 64
        paths["tenant-1"].unlink()
        save_adapter(paths["tenant-1"], bad.tensors, bad.meta)
        if defect == "corrupt":
            paths["tenant-1"].write_bytes(paths["tenant-1"].read_bytes()[:100])
        before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.iterdir()}

        error = AdapterError if defect == "corrupt" else AdapterValidationError
        with pytest.raises(error, match=message):
            aggregate_round(cfg, 1, str(global_path), [(c, str(p)) for c, p in paths.items()],
                            str(tmp_path / "next.safetensors"))

        after = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.iterdir()}
        assert after == before  # the global adapter is untouched and no output (or temp file) appeared

    def test_an_update_from_a_stranger_or_twice_from_one_client_is_rejected(self, setup, tmp_path):
        cfg, global_path, paths = setup
        with pytest.raises(AdapterValidationError, match="comes from 'mallory', which is not a client"):
            aggregate_round(cfg, 1, str(global_path), [("mallory", str(paths["tenant-0"]))],
                            str(tmp_path / "next.safetensors"))
        with pytest.raises(AdapterValidationError, match="client tenant-0 sent two updates for round 1"):
            aggregate_round(cfg, 1, str(global_path), [("tenant-0", str(paths["tenant-0"]))] * 2,
                            str(tmp_path / "next.safetensors"))
        with pytest.raises(AdapterValidationError, match="tenant-2's update .* says it is from 'tenant-0'"):
            aggregate_round(cfg, 1, str(global_path), [("tenant-2", str(paths["tenant-0"]))],
                            str(tmp_path / "next.safetensors"))
        assert not (tmp_path / "next.safetensors").exists()

    def test_the_output_never_replaces_an_existing_file(self, setup, tmp_path):
        cfg, global_path, paths = setup
        before = global_path.read_bytes()
        with pytest.raises(Exception, match="already exists"):
            aggregate_round(cfg, 1, str(global_path), [(c, str(p)) for c, p in paths.items()], str(global_path))
        assert global_path.read_bytes() == before

    @pytest.mark.parametrize("rule, params, counted", [
        ("fedmedian", {}, 3), ("fedtrimmedavg", {"beta": 0.0}, 3), ("krum", {}, 1), ("multikrum", {"to_keep": 2}, 2)])
    def test_every_rule_runs_as_the_aggregate_step(self, setup, tmp_path, rule, params, counted):
        cfg, global_path, paths = setup
        cfg = cfg.with_overrides({"strategy.name": rule, "strategy.params": params})
        meta = aggregate_round(cfg, 1, str(global_path), [(c, str(p)) for c, p in paths.items()],
                               str(tmp_path / "next.safetensors"))
        result = load_adapter(tmp_path / "next.safetensors")
        assert result.meta.metrics["strategy"] == rule and len(meta.metrics["counted"]) == counted
        assert set(meta.metrics["counted"]) <= set(meta.metrics["clients"]) == set(cfg.client_names)
        assert all(torch.isfinite(value).all() for value in result.tensors.values())

    def test_missing_clients_count_against_the_quorum(self, setup, tmp_path):
        cfg, global_path, paths = setup
        two = [(c, str(p)) for c, p in paths.items() if c != "tenant-2"]
        missing = {"tenant-2": "TimedOut: no update within the 30 s deadline"}
        with pytest.raises(QuorumError, match=r"round 1: 2 of 3 clients sent an update, below the quorum of 3 "
                                              r"\(policy.min_clients\) — tenant-2: TimedOut: no update within"):
            aggregate_round(cfg, 1, str(global_path), two, str(tmp_path / "next.safetensors"), missing)
        assert not (tmp_path / "next.safetensors").exists()

        at_quorum = cfg.with_overrides({"policy.min_clients": 2})
        meta = aggregate_round(at_quorum, 1, str(global_path), two, str(tmp_path / "next.safetensors"), missing)
        assert sorted(meta.metrics["clients"]) == ["tenant-0", "tenant-1"] and meta.samples == 30
        assert meta.metrics["missing"] == missing

    def test_server_state_goes_from_round_to_round_through_files(self, setup, tmp_path):
        """FedAdam over two rounds of the aggregate step (state file in, state file out) equals the
        rule run twice in memory; the file says whose state it is, and is never overwritten."""
        cfg, global_path, paths = setup
        cfg = cfg.with_overrides({"strategy.name": "fedadam", "strategy.params": {"eta": 0.05}})
        pairs = [(c, str(p)) for c, p in paths.items()]
        first, second = tmp_path / "g1.safetensors", tmp_path / "g2.safetensors"
        state1, state2 = tmp_path / "s1.safetensors", tmp_path / "s2.safetensors"
        aggregate_round(cfg, 1, str(global_path), pairs, str(first), state_out=str(state1))
        updates = [load_adapter(p) for p in paths.values()]
        later = []  # round 2: the same changes again, sent for round 2
        for client, adapter in zip(paths, updates):
            adapter.meta.round = 2
            save_adapter(tmp_path / f"{client}-2.safetensors", adapter.tensors, adapter.meta)
            later.append((client, str(tmp_path / f"{client}-2.safetensors")))
        aggregate_round(cfg, 2, str(first), later, str(second), state_in=str(state1), state_out=str(state2))

        strategy = build_strategy(cfg.strategy)
        memory = strategy.aggregate(load_adapter(global_path).tensors, iter(updates), {})
        memory = strategy.aggregate(memory.tensors, iter(updates), memory.state)
        for name in NAMES:
            torch.testing.assert_close(load_adapter(second).tensors[name], memory.tensors[name])
        state = load_server_state(str(state2), "fedadam")
        assert state["step"] == 2 and set(state) == {"step"} | {f"{m}.{n}" for m in "mv" for n in NAMES}

        with pytest.raises(FedFMError, match="belongs to strategy 'fedadam', not 'fedyogi'"):
            load_server_state(str(state2), "fedyogi")
        damaged = tmp_path / "damaged.safetensors"
        damaged.write_bytes(state2.read_bytes()[:50])
        with pytest.raises(FedFMError, match="server state .*damaged.safetensors is damaged"):
            load_server_state(str(damaged), "fedadam")
        before = state2.read_bytes()
        with pytest.raises(Exception, match="s2.safetensors already exists"):
            aggregate_round(cfg, 3, str(second), later, str(tmp_path / "g3.safetensors"), state_in=str(state2),
                            state_out=str(state2))
        assert state2.read_bytes() == before and not (tmp_path / "g3.safetensors").exists()

    @pytest.mark.parametrize("rule", ["fedavg", "fedmedian"])
    def test_norm_bounding_scales_each_update_before_any_rule(self, setup, tmp_path, rule):
        cfg, global_path, paths = setup
        updates = {c: load_adapter(p) for c, p in paths.items()}
        norms = {c: float(torch.cat([t.flatten() for t in u.tensors.values()]).norm()) for c, u in updates.items()}
        bound = sorted(norms.values())[1] * 1.001  # the largest update is scaled down, the others pass as they are
        cfg = cfg.with_overrides({"strategy.name": rule, "strategy.clip_norm": bound})
        meta = aggregate_round(cfg, 1, str(global_path), [(c, str(p)) for c, p in paths.items()],
                               str(tmp_path / "next.safetensors"))
        largest = max(norms, key=norms.get)
        assert meta.metrics["clipped"] == pytest.approx({largest: norms[largest]})
        clipped = []
        for client, adapter in updates.items():
            scale = min(1.0, bound / norms[client])
            clipped.append(Adapter({n: t * scale for n, t in adapter.tensors.items()}, adapter.meta))
        expected = build_strategy(StrategyConfig(name=rule)).aggregate(load_adapter(global_path).tensors,
                                                                      iter(clipped), {})
        for name in NAMES:
            torch.testing.assert_close(load_adapter(tmp_path / "next.safetensors").tensors[name],
                                       expected.tensors[name])
