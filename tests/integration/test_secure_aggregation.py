"""Secure aggregation end to end in ``fedfm simulate``: real fine-tunes, masked updates, dropouts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fedfm.adapters import load_adapter
from fedfm.errors import ConfigError, QuorumError, SecureAggregationError, TrainingError

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
    # the server never sees one update, so the head is averaged by samples (head.aggregation's fallback)
    plain = simulate(cfg.with_overrides({"head.aggregation": "samples"}), tmp_path / "plain")
    secure = simulate(cfg.with_overrides({"secure_aggregation.enabled": True}), tmp_path / "secure")
    for name, value in _final(plain).items():
        torch.testing.assert_close(_final(secure)[name], value, rtol=0, atol=1e-5)  # fixed point, 2^-24
    record = secure.history[1]
    assert record["samples"] == plain.history[1]["samples"]  # Σn, from the masked sum
    assert record["train_loss"] == pytest.approx(plain.history[1]["train_loss"], rel=1e-5)  # Σn·loss / Σn
    assert all(set(figures) <= {"started_at", "finished_at", "seconds", "setup_seconds", "step_seconds",
                                "bytes_down", "world_size", "zero_stage", "bf16", "bytes_up"}
               for figures in record["clients"].values())  # nothing of a client's data in the clear
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
    # the server never sees one update, so the head is averaged by samples (head.aggregation's fallback)
    plain = simulate(cfg.with_overrides({"head.aggregation": "samples"}), tmp_path / "plain")
    secure = simulate(cfg.with_overrides({"secure_aggregation.enabled": True, "secure_aggregation.threshold": 3}),
                      tmp_path / "secure")
    record = secure.history[1]
    assert sorted(record["clients"]) == ["tenant-0", "tenant-1", "tenant-3"]
    assert "the node was preempted" in record["missing"]["tenant-2"]
    for name, value in _final(plain).items():
        torch.testing.assert_close(_final(secure)[name], value, rtol=0, atol=1e-5)
    meta = load_adapter(secure.output / "work" / "round-1" / "global_adapter.safetensors").meta
    assert meta.metrics["secure_aggregation"]["dropped"] == ["tenant-2"]


def test_a_tenants_malformed_masked_update_drops_that_tenant_not_the_round(tiny_config, tmp_path, monkeypatch):
    """Issue 17, finding 8: one malformed message ended the round for everyone. Now its sender counts as
    dropped (the survivors' shares remove its masks) and the round aggregates the others."""
    from fedfm import storage
    from fedfm.simulation import simulate
    from fedfm.trust import secure_round

    honest_mask = secure_round.mask

    def hostile(cfg, client, round_index, update_uri, keys_uri, masked_out, noise=None):
        honest_mask(cfg, client, round_index, update_uri, keys_uri, masked_out, noise)
        if client == "tenant-1":
            storage.write_bytes(masked_out, b"\x08" + b"\x00" * 7 + b"{not a header", overwrite=True)

    monkeypatch.setattr(secure_round, "mask", hostile)
    cfg = tiny_config(rounds=1, clients=4, **{"policy.min_clients": 3, "secure_aggregation.enabled": True,
                                              "secure_aggregation.threshold": 3})
    record = simulate(cfg, tmp_path / "secure").history[1]
    assert sorted(record["clients"]) == ["tenant-0", "tenant-2", "tenant-3"]
    assert record["missing"]["tenant-1"].startswith("rejected: client tenant-1's masked update")
    meta = load_adapter(tmp_path / "secure" / "work" / "round-1" / "global_adapter.safetensors").meta
    assert meta.metrics["secure_aggregation"]["dropped"] == ["tenant-1"]


def test_messages_forged_in_another_tenants_name_are_refused_naming_it(tiny_config, tmp_path, monkeypatch):
    """Issue 17, finding 3: a masked update's ``client`` header was free text, so tenant-0, with write access to
    the round's storage, could replace tenant-1's masked update with one of its own making (and tenant-2's
    revealed shares). Each message is now signed with its client's registered key: the forgeries (signed with
    tenant-0's key, which is all it has) are refused naming tenant-1 and tenant-2. Tenant-1's masks are removed
    as a dropout's; tenant-2's seeds come from the other survivors' shares."""
    from safetensors.torch import load as safetensors_load
    from safetensors.torch import save as safetensors_save

    from fedfm import storage
    from fedfm.adapters import header_of
    from fedfm.simulation import simulate
    from fedfm.trust import secure_round, signing

    honest_mask = secure_round.mask

    def forging(cfg, client, round_index, update_uri, keys_uri, masked_out, noise=None):
        honest_mask(cfg, client, round_index, update_uri, keys_uri, masked_out, noise)
        if client == "tenant-1":
            data = storage.read_bytes(masked_out)
            vector = safetensors_load(data)["masked"].numpy().view(np.uint64) + np.uint64(1 << 40)
            header = {key: value for key, value in header_of(data).items() if key != "signature"}
            mallory = signing.load_identity("tenant-0", cfg.client_state_location("tenant-0"))
            header["signature"] = signing.sign(mallory, "masked update", secure_round.context(cfg, round_index),
                                               "tenant-1", *secure_round._masked_parts(vector, header))
            storage.write_bytes(masked_out, safetensors_save({"masked": torch.from_numpy(vector.view(np.int64))},
                                                             metadata=header), overwrite=True)

    honest_reveal = secure_round.reveal

    def forging_shares(cfg, client, round_index, *uris):
        honest_reveal(cfg, client, round_index, *uris)
        if client == "tenant-2":
            message = json.loads(Path(uris[-1]).read_text())
            share = message["shares"]["tenant-3"]["b"]
            share["y"] = format(int(share["y"], 16) ^ 1, "x")  # what would make tenant-3's seed come out wrong
            mallory = signing.load_identity("tenant-0", cfg.client_state_location("tenant-0"))
            message["signature"] = signing.sign(mallory, "revealed shares", secure_round.context(cfg, round_index),
                                                "tenant-2", json.dumps(message["shares"], sort_keys=True).encode())
            Path(uris[-1]).write_text(json.dumps(message))

    monkeypatch.setattr(secure_round, "mask", forging)
    monkeypatch.setattr(secure_round, "reveal", forging_shares)
    cfg = tiny_config(rounds=1, clients=5, **{"policy.min_clients": 3, "secure_aggregation.enabled": True,
                                              "secure_aggregation.threshold": 3})
    record = simulate(cfg, tmp_path / "secure").history[1]
    assert sorted(record["clients"]) == ["tenant-0", "tenant-2", "tenant-3", "tenant-4"]
    for client, message in (("tenant-1", "masked update"), ("tenant-2", "revealed shares")):
        assert record["missing"][client] == (f"rejected: the {message} of client {client} does not carry its "
                                             "registered key's signature: substituted or forged, and refused")


def test_an_impossible_masked_weight_is_caught_in_the_unmasked_sum(tiny_config, tmp_path, monkeypatch):
    """Issue 17, finding 8: a tenant that puts a weight of −10⁶ into the masked sum once flipped the round's
    mean update (or divided it by 0); the unmasked sum is now checked and no aggregate is written."""
    from fedfm.errors import SecureAggregationError
    from fedfm.simulation import simulate
    from fedfm.trust import secure_round

    honest_contribution = secure_round._contribution

    def hostile(cfg, round_index, client, tensors, samples, train_loss, noise):
        contribution = honest_contribution(cfg, round_index, client, tensors, samples, train_loss, noise)
        if client == "tenant-1":
            contribution[secure_round.WEIGHT] = torch.tensor([-1e6])
        return contribution

    monkeypatch.setattr(secure_round, "_contribution", hostile)
    cfg = tiny_config(rounds=1, clients=3, **{"secure_aggregation.enabled": True})
    with pytest.raises(SecureAggregationError, match="the unmasked sum of the survivors' sample counts is .* for 3 "
                                                     "clients: a client put in an impossible weight"):
        simulate(cfg, tmp_path / "secure")
    assert not (tmp_path / "secure" / "work" / "round-1" / "global_adapter.safetensors").exists()


@pytest.mark.parametrize("forged", ["update", "count"])
def test_under_privacy_an_unclipped_update_or_a_forged_count_is_caught_in_the_unmasked_sum(
        tiny_config, tmp_path, monkeypatch, forged):
    """Issue 17, finding 8 under DP: the server cannot see whether a tenant clipped its update, and a tenant that
    put in its update ×1000 (or a count of −1000 unclipped updates, steering adaptive clipping) once moved the
    model as it liked. The unmasked sum is now held to what |U| clipped updates and their noise can make."""
    from fedfm.errors import SecureAggregationError
    from fedfm.simulation import simulate
    from fedfm.trust import secure_round

    honest_contribution = secure_round._contribution

    def hostile(cfg, round_index, client, tensors, samples, train_loss, noise):
        contribution = honest_contribution(cfg, round_index, client, tensors, samples, train_loss, noise)
        if client == "tenant-1" and forged == "update":
            contribution = {name: value * 1000 if name != secure_round.UNCLIPPED else value
                            for name, value in contribution.items()}
        elif client == "tenant-1":
            contribution[secure_round.UNCLIPPED] = torch.tensor([-1000.0])
        return contribution

    monkeypatch.setattr(secure_round, "_contribution", hostile)
    cfg = tiny_config(rounds=1, clients=3, **{"secure_aggregation.enabled": True, "privacy.noise_multiplier": 0.5,
                                              "privacy.clip_norm": 0.5, "privacy.adaptive_clipping": {}})
    message = (r"the unmasked sum of the 3 survivors' updates has norm .* more than 3 updates clipped to 0.5 and "
               r"their noise can make" if forged == "update" else
               r"the unmasked count of unclipped updates is -9\d\d.* for 3 survivors .* a client put in a forged count")
    with pytest.raises(SecureAggregationError, match=message):
        simulate(cfg, tmp_path / "secure")
    assert not (tmp_path / "secure" / "work" / "round-1" / "global_adapter.safetensors").exists()


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


def test_under_privacy_a_quarantined_client_does_not_thin_the_noise_of_the_clients_drawn(tiny_config, tmp_path):
    """Each client adds σ·C/√m of noise, m the quorum of the round's clients, so that the fewest survivors the
    round accepts add up to σ·C. A quarantined client is never drawn: counted in m anyway (as it was), the quorum
    of the clients actually drawn (3 of 4) survived with σ·C·√(3/4) of noise, below what ε was spent for."""
    from fedfm.federation import round_clients
    from fedfm.server_state import read_server_state, save_server_state
    from fedfm.trust import privacy, secure_round
    from fedfm.trust.update_checks import Quarantine

    cfg = tiny_config(rounds=2, clients=4, **{"secure_aggregation.enabled": True, "privacy.noise_multiplier": 0.5,
                                              "privacy.clip_norm": 0.5, "policy.quarantine_after_failures": 1,
                                              "execution.client_state_uri": str(tmp_path / "client-state")})
    state = tmp_path / "server_state"
    quarantine = Quarantine(since={"tenant-3": (1, "no usable update in round 1")})
    save_server_state(str(state), "fedavg", 1, {**privacy.PrivacyState(sampling_key="ab" * 32).as_state(),
                                                **quarantine.as_state()})
    published = {}
    for client in ("tenant-0", "tenant-1", "tenant-2"):
        published[client] = tmp_path / f"{client}.json"
        secure_round.advertise(cfg, client, 2, str(published[client]))
    keys = tmp_path / "keys.json"
    # the round's clients as the select step draws them (the quarantined one is not), which relay_keys counts
    drawn = round_clients(cfg, 2, read_server_state(cfg, str(state)))
    assert drawn == ["tenant-0", "tenant-1", "tenant-2"]
    secure_round.relay_keys(cfg, 2, {c: str(path) for c, path in published.items()}, str(keys), drawn,
                            secure_round.local_registry(cfg))

    noise = secure_round.train_inputs(cfg, str(keys), str(state))
    fewest_survivors = cfg.quorum(3)
    mechanism = privacy.update_noise_multiplier(cfg) * noise["clip_norm"]
    assert noise["noise_stddev"] * math.sqrt(fewest_survivors) == pytest.approx(mechanism)
    assert json.loads(keys.read_text())["drawn"] == 3


def test_secure_aggregation_is_refused_where_it_cannot_run(tiny_config, tmp_path: Path):
    from fedfm.strategies import check_federation

    with pytest.raises(ConfigError, match="secure_aggregation gives the server only the round's mean update; "
                                          "strategy 'krum' needs each update"):
        check_federation(tiny_config(**{"secure_aggregation.enabled": True, "strategy.name": "krum"}))
    with pytest.raises(ConfigError, match="compression.method 'int8' cannot be combined with secure_aggregation"):
        tiny_config(**{"secure_aggregation.enabled": True, "compression.method": "int8"})
    with pytest.raises(ConfigError, match="needs at least 3 clients"):
        check_federation(tiny_config(clients=2, **{"secure_aggregation.enabled": True}))


# --- the same protocol as pipeline steps: `fedfm run` (kfp.local) and `fedfm compile` ---------------------


# Under kfp.local, the protocol's tasks and what they hold: test_resume's run-secure-aggregation case, whose
# pipeline run (interrupted and resumed) also gives simulate's adapter.


def test_cli_compiles_a_secure_pipeline_that_validates(tiny_config, tmp_path):
    import yaml
    from typer.testing import CliRunner

    from fedfm.cli import app

    cfg = tiny_config(rounds=2, clients=3, **{"secure_aggregation.enabled": True,
                                              "execution.client_state_uri": str(tmp_path / "client-state")})
    config_file = tmp_path / "federation.yaml"
    config_file.write_text(yaml.safe_dump(cfg.as_dict()))
    runner = CliRunner()
    result = runner.invoke(app, ["compile", "--config", str(config_file), "--output", str(tmp_path / "p.yaml")])
    assert result.exit_code == 0, result.output

    tasks = yaml.safe_load((tmp_path / "p.yaml").read_text())["root"]["dag"]["tasks"]
    names = {task["taskInfo"]["name"] for task in tasks.values()}
    for round_index in (1, 2):
        assert {f"round-{round_index}-{loop}" for loop in ("advertise", "share", "clients", "confirm",
                                                           "reveal")} <= names
        assert {f"round {round_index}: {step}" for step in ("relay keys", "relay shares", "sum masked updates",
                                                              "relay confirmations", "unmask and aggregate")} <= names
    assert not any(name.startswith("aggregate") for name in tasks)  # the plain aggregate step is not there
    loops = {task["taskInfo"]["name"]: task["parameterIterator"]["items"]["inputParameter"]
             for task in tasks.values() if "parameterIterator" in task}
    # the survivors confirm, and those that confirmed reveal
    assert loops["round-1-confirm"] == "pipelinechannel--secagg-sum-Output"
    assert loops["round-1-reveal"] == "pipelinechannel--secagg-relay-confirmations-Output"

    result = runner.invoke(app, ["validate", "--config", str(config_file), "--pipeline", str(tmp_path / "p.yaml")])
    assert result.exit_code == 0, result.output
    assert "2 round(s)" in result.output
    plain_file = tmp_path / "plain.yaml"
    plain_file.write_text(yaml.safe_dump(cfg.with_overrides({"secure_aggregation.enabled": False}).as_dict()))
    result = runner.invoke(app, ["validate", "--config", str(plain_file), "--pipeline", str(tmp_path / "p.yaml")])
    assert result.exit_code != 0
    assert "secure_aggregation.enabled False" in result.output + str(result.exception)


class _Artifact:
    """What a KFP step sees of an artifact: a local path, a URI and metadata (which travels with it)."""

    def __init__(self, path: Path):
        self.path, self.uri, self.metadata = str(path), str(path), {}


def _failing_steps_as_outcomes(monkeypatch) -> None:
    """The executor as the cluster's behaves: a client step that raises is a Failed ClientRound, which
    the pipeline step records, not a failed pipeline task."""
    from fedfm import executors, secure_pipeline

    class Reporting(executors.LocalExecutor):
        def secure_step(self, cfg, client, round_index, phase, inputs, output):
            try:
                return super().secure_step(cfg, client, round_index, phase, inputs, output)
            except Exception as exc:
                return executors.ClientOutcome(client, "Failed", f"{type(exc).__name__}: {exc}")

    monkeypatch.setattr(executors, "build_executor", lambda cfg, run_id="": Reporting())
    monkeypatch.setattr(secure_pipeline, "build_executor", lambda cfg, run_id="": Reporting())


def _pipeline_round_here(cfg, work: Path) -> _Artifact:
    """Round 1 of the secure pipeline with its step functions called in the DAG's order, in this process
    (kfp.local's subprocesses would not see a test's monkeypatching); returns the new global adapter."""
    from fedfm import storage
    from fedfm.components import secure_aggregation as steps
    from fedfm.federation import initialize, round_clients
    from fedfm.server_state import read_server_state, write_initial_server_state

    config, run_id = cfg.as_dict(), "test-run"
    start = 1  # start_round: no round is restored from a checkpoint

    def artifact(*name: str) -> _Artifact:
        return _Artifact(work.joinpath(*name))

    def each(name: str, step, items: list[str], **inputs) -> list[_Artifact]:
        outputs = [artifact(name, client) for client in items]
        for client, output in zip(items, outputs):
            step(config, client, 1, start, run_id, **inputs, **{name: output})
        return outputs

    global_adapter, server_state = artifact("global_adapter"), artifact("server_state")
    initialize(cfg, global_adapter.path)
    write_initial_server_state(cfg, server_state.path)
    clients = round_clients(cfg, 1, read_server_state(cfg, server_state.path))
    keys, keys_shared, inboxes = artifact("keys"), artifact("keys_shared"), artifact("inboxes")
    steps.secagg_relay_keys(config, 1, start, run_id, clients, each("public_keys", steps.secagg_advertise, clients),
                            keys)
    steps.secagg_relay_shares(config, 1, start, keys, each("shares", steps.secagg_share, clients, keys=keys),
                              keys_shared, inboxes)
    updates = each("update", steps.secagg_finetune, clients, global_adapter=global_adapter, keys_shared=keys_shared,
                   server_state=server_state)
    survivors, masked_sum, figures = artifact("survivors"), artifact("masked_sum"), artifact("figures")
    answering = steps.secagg_sum(config, 1, start, run_id, global_adapter, updates, keys_shared, survivors, masked_sum,
                                 figures)
    confirmations = artifact("confirmations")
    confirmers = steps.secagg_relay_confirmations(
        config, 1, start, run_id, keys_shared, survivors,
        each("confirmation", steps.secagg_confirm, answering, keys_shared=keys_shared, survivors=survivors),
        confirmations)
    reveals = each("reveal", steps.secagg_reveal, confirmers, keys_shared=keys_shared, inboxes=inboxes,
                   survivors=survivors, confirmations=confirmations)
    new_global = artifact("new_global_adapter")
    steps.secagg_finish(config, 1, start, run_id, global_adapter, keys_shared, survivors, masked_sum, figures,
                        confirmations, reveals, server_state, new_global, artifact("new_server_state"))
    return new_global


def test_the_pipeline_steps_go_on_without_clients_that_fail_a_step_as_simulate_does(tiny_config, tmp_path,
                                                                                   monkeypatch):
    """One client fails to advertise (it is skipped from then on), another fails its fine-tune after it
    shared (its masks are recovered): the steps' artifacts carry why, and the round is simulate's."""
    from fedfm.pipelines.local_runner import with_client_state_here
    from fedfm.simulation import simulate
    from fedfm.trust import secure_round

    original = secure_round.advertise

    def unreachable(cfg, client, round_index, public_out):
        if client == "tenant-1":
            raise ConnectionError("tenant-1's cluster is unreachable")
        return original(cfg, client, round_index, public_out)

    monkeypatch.setattr(secure_round, "advertise", unreachable)
    _dropping(monkeypatch, "tenant-3", 1)
    _failing_steps_as_outcomes(monkeypatch)
    cfg = tiny_config(rounds=1, clients=5, **{"secure_aggregation.enabled": True, "policy.min_clients": 3})
    simulated = simulate(cfg, tmp_path / "sim")
    new_global = _pipeline_round_here(with_client_state_here(cfg, tmp_path / "pipe"), tmp_path / "pipe" / "work")

    meta = load_adapter(new_global.path).meta
    assert sorted(meta.metrics["clients"]) == sorted(simulated.history[1]["clients"]) == [
        "tenant-0", "tenant-2", "tenant-4"]
    assert meta.metrics["missing"] == simulated.history[1]["missing"] == {
        "tenant-1": "Failed in secure aggregation advertise: ConnectionError: tenant-1's cluster is unreachable",
        "tenant-3": "Failed: TrainingError: client tenant-3: the node was preempted"}
    assert new_global.metadata["missing"] == meta.metrics["missing"]
    assert meta.metrics["secure_aggregation"]["dropped"] == ["tenant-3"]  # it shared, so its masks were removed
    for name, value in _final(simulated).items():
        torch.testing.assert_close(load_adapter(new_global.path).tensors[name], value, rtol=0, atol=1e-5)


def test_the_pipeline_steps_pass_the_clients_how_to_clip_and_noise_under_privacy(tiny_config, tmp_path):
    """The fine-tune step hands each client the server's clip norm and noise scale; with the noise seeded,
    the round is simulate's."""
    from fedfm.pipelines.local_runner import with_client_state_here
    from fedfm.simulation import simulate

    cfg = tiny_config(rounds=1, clients=3, **{"secure_aggregation.enabled": True, "privacy.noise_multiplier": 0.5,
                                              "privacy.clip_norm": 0.5, "privacy.adaptive_clipping": {},
                                              "privacy.noise_seed": 7})
    simulated = simulate(cfg, tmp_path / "sim")
    new_global = _pipeline_round_here(with_client_state_here(cfg, tmp_path / "pipe"), tmp_path / "pipe" / "work")

    ours = load_adapter(new_global.path)
    expected = simulated.history[1]["privacy"]
    assert ours.meta.metrics["privacy"] == expected and expected["noise"] == "client" and "unclipped" in expected
    for name, value in _final(simulated).items():
        torch.testing.assert_close(ours.tensors[name], value, rtol=0, atol=1e-5)


def test_a_pipeline_compiled_without_secure_aggregation_refuses_a_config_that_turns_it_on(tiny_config, tmp_path):
    """The run's config parameter can differ from the compiled one: a pipeline without the protocol's
    steps must not aggregate plain updates for a config that asks for secure aggregation."""
    from fedfm.components.init_federation import init_federation
    from fedfm.run_parameters import run_parameter_values

    cfg = tiny_config(**{"secure_aggregation.enabled": True, "execution.client_state_uri": str(tmp_path / "cs")})
    outputs = {name: _Artifact(tmp_path / name) for name in ("global_adapter", "server_state", "history")}
    values = run_parameter_values(cfg)
    with pytest.raises(ConfigError, match="pipeline was compiled without its steps: recompile"):
        init_federation(config=cfg.as_dict(), run_id="", start_round=1, compiled_rounds=cfg.rounds,
                        compiled_secure_aggregation=False,
                        compiled_execution_mode="local", compiled_parameters=values, **values, **outputs)
    assert not (tmp_path / "global_adapter").exists()


# --- issue 17, finding 7: evaluation under secure aggregation -----------------------------------------------


def test_evaluation_under_secure_aggregation_reveals_the_survivors_sum_only(tiny_config, tmp_path):
    """Each tenant's evaluation counts once reached the platform in the clear. Now the round's survivors
    send them masked among themselves: the server reads their sum, which is what scoring the adapter on the
    survivors' data gives, and no tenant's; the record names no client's figures. Round 0, before any
    pairwise keys exist, is not evaluated at all."""
    from fedfm.evaluation import evaluate_clients
    from fedfm.simulation import simulate
    from fedfm.tasks import LossSums

    cfg = tiny_config(rounds=2, clients=3, **{"secure_aggregation.enabled": True})
    run = simulate(cfg, tmp_path / "secure")
    assert math.isnan(run.history[0]["eval"]["global"]["accuracy"]) and run.history[0]["eval"]["clients"] == {}
    assert run.history[0]["eval_note"].startswith("not evaluated")
    for record in run.history[1:]:
        adapter = str(run.output / "work" / f"round-{record['round']}" / "global_adapter.safetensors")
        survivors = load_adapter(adapter).meta.metrics["secure_aggregation"]["survivors"]
        expected = LossSums()
        for counts in evaluate_clients(cfg, adapter, survivors).values():
            expected.add(counts)
        assert record["eval"]["clients"] == {} and record["eval_missing"] == {}
        assert record["eval"]["global"]["accuracy"] == expected.metrics(cfg.task)["accuracy"]
        assert record["eval"]["global"]["samples"] == expected.examples
        assert record["eval"]["global"]["loss"] == pytest.approx(expected.metrics(cfg.task)["loss"], abs=1e-5)
        assert record["eval_note"] == "summed over the round's 3 survivors, each tenant's counts masked"
    # what went over the wire: masked vectors, none of them a tenant's counts
    answers = sorted((run.output / "work" / "round-2" / "secagg" / "evaluation").glob("tenant-*.evaluation.json"))
    assert len(answers) == 3
    for answer in answers:
        masked = np.frombuffer(bytes.fromhex(json.loads(answer.read_text())["masked"]), dtype="<u8")
        assert (masked > 2**40).all() and (masked < 2**64 - 2**40).all()  # no small count, no small negative


def test_a_survivor_that_does_not_answer_the_evaluation_leaves_every_count_masked(tiny_config, tmp_path,
                                                                                  monkeypatch):
    from fedfm.simulation import simulate
    from fedfm.trust import secure_round

    honest = secure_round.evaluate

    def silent(cfg, client, *args):
        if client == "tenant-1":
            raise TrainingError("client tenant-1: the node was preempted")
        return honest(cfg, client, *args)

    monkeypatch.setattr(secure_round, "evaluate", silent)
    cfg = tiny_config(rounds=1, clients=3, **{"secure_aggregation.enabled": True})
    record = simulate(cfg, tmp_path / "secure").history[1]
    assert record["eval"]["global"]["samples"] == 0 and record["eval"]["clients"] == {}
    assert "the node was preempted" in record["eval_missing"]["tenant-1"]
    assert record["eval_note"].startswith("not revealed: tenant-1 gave no evaluation")


def test_a_tenant_cannot_be_made_to_evaluate_twice_nor_to_answer_in_anothers_name(tiny_config, tmp_path):
    """Two answers under the same masks would give the server their difference: a client answers once per
    round. And the server adds only answers signed by their client for this round and adapter: one forged
    in another's name (or replayed from another round) is refused, naming the client, and the round's
    evaluation is then not revealed rather than wrong."""
    from fedfm.adapters import read_meta
    from fedfm.simulation import simulate
    from fedfm.trust import secure_round

    cfg = tiny_config(rounds=2, clients=3, **{"secure_aggregation.enabled": True,
                                              "execution.client_state_uri": str(tmp_path / "state")})
    run = simulate(cfg, tmp_path / "secure")
    box = run.output / "work" / "round-2" / "secagg"
    adapter = str(run.output / "work" / "round-2" / "global_adapter.safetensors")
    inputs = [str(box / "evaluation" / f"{name}.json") for name in ("keys", "survivors", "confirmations")]
    with pytest.raises(SecureAggregationError, match="tenant-0 has already evaluated round 2"):
        secure_round.evaluate(cfg, "tenant-0", 2, adapter, *inputs, str(tmp_path / "again.json"))

    answers = {client: str(box / "evaluation" / f"{client}.evaluation.json") for client in cfg.client_names}
    registry = secure_round.local_registry(cfg)
    sha = read_meta(adapter).sha256
    missing: dict[str, str] = {}
    total, _ = secure_round.sum_evaluations(cfg, 2, sha, cfg.client_names, answers, registry, missing)
    assert total is not None and missing == {}
    forged = json.loads(Path(answers["tenant-0"]).read_text())
    forged["client"] = "tenant-1"
    (tmp_path / "forged.json").write_text(json.dumps(forged))
    earlier = str(run.output / "work" / "round-1" / "secagg" / "evaluation" / "tenant-1.evaluation.json")
    for answer, why in ((str(tmp_path / "forged.json"), "does not carry its registered key's signature"),
                        (earlier, "not its masked evaluation of round 2")):
        missing = {}
        total, note = secure_round.sum_evaluations(cfg, 2, sha, cfg.client_names, {**answers, "tenant-1": answer},
                                                   registry, missing)
        assert total is None and why in missing["tenant-1"] and note.startswith("not revealed: tenant-1")


def test_a_forged_evaluation_inside_the_masked_sum_is_refused_not_shown(tiny_config, tmp_path, monkeypatch):
    """Issue 17, finding 11 under the masks: a tenant that claims a million correct answers cannot be bounded
    alone (its counts are masked), but the survivors' sum it lands in is impossible, and is not shown."""
    import fedfm.evaluation
    from fedfm.simulation import simulate
    from fedfm.tasks import LossSums

    honest = fedfm.evaluation.evaluate_clients

    def forging(cfg, adapter_uri, clients):
        counts = honest(cfg, adapter_uri, clients)
        if clients == ["tenant-2"]:
            counts["tenant-2"] = LossSums(0.0, 30, 10**6, 30)
        return counts

    monkeypatch.setattr(fedfm.evaluation, "evaluate_clients", forging)
    cfg = tiny_config(rounds=1, clients=3, **{"secure_aggregation.enabled": True})
    record = simulate(cfg, tmp_path / "secure").history[1]
    assert record["eval"]["global"]["samples"] == 0 and record["eval_missing"] == {}
    assert record["eval_note"].startswith("refused: the survivors' summed counts")
    assert "a survivor forged its evaluation" in record["eval_note"]
