"""The federated_finetune pipeline: compiled for Kubeflow, and run end to end under kfp.local."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from fedfm import events
from fedfm.config import CENTRALIZED_CLIENT
from fedfm.errors import FedFMError

pytestmark = pytest.mark.slow


def test_compiled_yaml_loads_with_kfps_loader_and_has_the_round_structure(tiny_config, tmp_path):
    from kfp.components import load_component_from_file

    from fedfm.pipelines.federated_finetune import compile_pipeline

    cfg = tiny_config(rounds=3, parallelism=2)
    compile_pipeline(cfg, str(tmp_path / "p.yaml"), image="registry.example/fedfm:test")
    component = load_component_from_file(str(tmp_path / "p.yaml"))
    assert component.name == "fedfm-fedfm"  # fedfm-NAME, the federation's name
    assert sorted(component.component_spec.outputs) == ["adapter", "history"]

    spec = yaml.safe_load((tmp_path / "p.yaml").read_text())
    assert spec["root"]["inputDefinitions"]["parameters"]["config"]["defaultValue"] == cfg.as_dict()
    assert spec["root"]["inputDefinitions"]["parameters"]["start_round"]["defaultValue"] == 1
    tasks = spec["root"]["dag"]["tasks"]
    loops = {task["taskInfo"]["name"]: task for task in tasks.values() if "parameterIterator" in task}
    assert sorted(loops) == ["round-1-clients", "round-2-clients", "round-3-clients"]
    assert all(task["iteratorPolicy"]["parallelismLimit"] == 2 for task in loops.values())
    # each round's clients are the output of that round's select-clients step
    selectors = {name: task for name, task in tasks.items() if task["taskInfo"]["name"].endswith("select clients")}
    assert len(selectors) == 3
    assert {task["parameterIterator"]["items"]["inputParameter"] for task in loops.values()} == {
        f"pipelinechannel--{name}-Output" for name in selectors}
    display = sorted(task["taskInfo"]["name"] for task in tasks.values())
    assert "round 3: aggregate" in display and "round 0: evaluate" in display and "export" in display
    executors = spec["deploymentSpec"]["executors"].values()
    assert {executor["container"]["image"] for executor in executors} == {"registry.example/fedfm:test"}
    commands = " ".join(" ".join(executor["container"]["command"]) for executor in executors)
    assert "pip install" not in commands  # the image carries everything; nothing installs at run time


def test_the_compiled_pipeline_has_typed_run_parameters_a_ui_user_can_change(tiny_config, tmp_path):
    """Issue 18, item 1: beside ``config``, the knobs people change per run, each with its type and the
    compiled config's value (integers as integers, in the file the UI reads); what is fixed at compile time is
    named in the description."""
    from kfp.components import load_component_from_file

    from fedfm.pipelines.federated_finetune import compile_pipeline

    cfg = tiny_config(rounds=2, **{"name": "support-tickets", "training.local_steps": 6, "policy.min_clients": 2})
    compile_pipeline(cfg, str(tmp_path / "p.yaml"))
    component = load_component_from_file(str(tmp_path / "p.yaml"))
    assert component.name == "fedfm-support-tickets"
    inputs = {name: (spec.type, spec.default) for name, spec in component.component_spec.inputs.items()}
    assert inputs == {
        "config": ("Dict", cfg.as_dict()), "start_round": ("Integer", 1),
        "model": ("String", cfg.model.name_or_path), "dataset": ("String", "builtin:topics"),
        "learning_rate": ("Float", 5e-3), "local_steps": ("Integer", 6), "batch_size": ("Integer", 8),
        "lora_r": ("Integer", 4), "lora_alpha": ("Float", 8.0), "strategy": ("String", "fedavg"),
        "strategy_params": ("Dict", {}), "sample_fraction": ("Float", 1.0), "min_clients": ("Integer", 2),
        "target_epsilon": ("Float", 0.0), "seed": ("Integer", 0)}
    assert all(type(default) is int for kind, default in inputs.values() if kind == "Integer")
    assert ("Compiled for 2 round(s), the clients tenant-0, tenant-1, tenant-2, without secure aggregation, clients "
            "trained in the pipeline's pods (execution.mode local)") in component.description
    text = (tmp_path / "p.yaml").read_text()
    assert "rounds': 2," in text and "batch_size: int [Default: 8]" in text  # the header, as the file shows it


def _compiled_tasks(path) -> dict[str, dict]:
    """Each task of a compiled pipeline by its display name: its retry policy and caching, its container's
    resources and its Kubernetes settings (the platform spec kfp-kubernetes writes)."""
    spec, *platform = yaml.safe_load_all(path.read_text())  # no platform spec where no task has settings
    kubernetes = platform[0]["platforms"]["kubernetes"]["deploymentSpec"]["executors"] if platform else {}
    dags = [spec["root"]["dag"]] + [component["dag"] for component in spec["components"].values() if "dag" in component]
    tasks = {}
    for dag in dags:
        for task in dag["tasks"].values():
            if "parameterIterator" in task:  # a loop: its tasks are in its own DAG
                continue
            executor = spec["components"][task["componentRef"]["name"]]["executorLabel"]
            tasks[task["taskInfo"]["name"]] = {
                "retry": task.get("retryPolicy"), "cache": task["cachingOptions"].get("enableCache", False),
                "resources": spec["deploymentSpec"]["executors"][executor]["container"].get("resources", {}),
                "kubernetes": kubernetes.get(executor, {})}
    return tasks


def test_each_task_runs_with_the_kubernetes_settings_of_its_role(tiny_config, tmp_path):
    """Issue 18, item 2: on a Kubeflow Pipelines cluster in local mode, the tasks that train and score (each
    client step, evaluate) get the config's resources, GPUs, node selector, tolerations, PVCs and Secrets; the
    other tasks theirs; in kubernetes mode the client steps only launch the tenants' Jobs and ask for little.
    No task is served from KFP's cache and each is retried as configured."""
    from fedfm.pipelines.federated_finetune import compile_pipeline

    client = {"cpu": "4", "memory": "16Gi", "memory_limit": "20Gi", "accelerator_type": "nvidia.com/gpu",
              "accelerator_count": 2, "node_selector": {"pool": "gpu"},
              "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
              "volumes": [{"pvc": "tenant-data", "mount_path": "/data"}],
              "secrets": [{"name": "data-s3", "env": {"key-id": "AWS_ACCESS_KEY_ID"}},
                          {"name": "data-ca", "mount_path": "/etc/ca"}]}
    cfg = tiny_config(rounds=1, **{"execution.kfp": {"client": client, "server": {"cpu": "1", "memory": "4Gi"},
                                                     "image_pull_secrets": ["registry-key"], "retries": 3}})
    compile_pipeline(cfg, str(tmp_path / "local.yaml"))
    tasks = _compiled_tasks(tmp_path / "local.yaml")
    assert sorted(tasks) == ["export", "init", "round 0: evaluate", "round 1: aggregate", "round 1: evaluate",
                             "round 1: fine-tune", "round 1: select clients"]
    training = {"round 1: fine-tune", "round 0: evaluate", "round 1: evaluate"}
    for name, task in tasks.items():
        assert task["retry"]["maxRetryCount"] == 3 and task["retry"]["backoffDuration"] == "30s", name
        assert task["cache"] is False, name
        assert [s["secretName"] for s in task["kubernetes"]["imagePullSecret"]] == ["registry-key"], name
        resources, settings = task["resources"], task["kubernetes"]
        if name in training:
            assert (resources["resourceCpuRequest"], resources["resourceMemoryRequest"],
                    resources["resourceMemoryLimit"]) == ("4", "16Gi", "20Gi"), name
            assert (resources["accelerator"]["resourceType"], resources["accelerator"]["resourceCount"]) == (
                "nvidia.com/gpu", "2"), name
            assert settings["nodeSelector"] == {"labels": {"pool": "gpu"}}
            assert settings["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
            assert [(m["constant"], m["mountPath"]) for m in settings["pvcMount"]] == [("tenant-data", "/data")]
            assert [(s["secretName"], s["keyToEnv"]) for s in settings["secretAsEnv"]] == [
                ("data-s3", [{"secretKey": "key-id", "envVar": "AWS_ACCESS_KEY_ID"}])]
            assert [(s["secretName"], s["mountPath"]) for s in settings["secretAsVolume"]] == [("data-ca", "/etc/ca")]
        else:
            assert (resources["resourceCpuRequest"], resources["resourceMemoryRequest"]) == ("1", "4Gi"), name
            assert "accelerator" not in resources and set(settings) == {"imagePullSecret"}, name

    # kubernetes mode, secure aggregation: every client step is a launcher with small requests
    cluster = tiny_config(rounds=1, **{"execution.mode": "kubernetes", "execution.storage_uri": "s3://fed/runs",
                                       "secure_aggregation.enabled": True, "data.labels": ["a", "b", "c", "d"]})
    compile_pipeline(cluster, str(tmp_path / "cluster.yaml"))
    tasks = _compiled_tasks(tmp_path / "cluster.yaml")
    launchers = {name for name, task in tasks.items() if task["resources"]}
    assert launchers == {"round 0: evaluate", "round 1: evaluate", "round 1: advertise keys", "round 1: share keys",
                         "round 1: fine-tune", "round 1: confirm survivors", "round 1: reveal shares"}
    assert all(tasks[name]["resources"] == {"cpuRequest": 0.1, "resourceCpuRequest": "100m",
                                            "memoryRequest": 0.536870912, "resourceMemoryRequest": "512Mi"}
               for name in launchers)
    assert all(task["retry"]["maxRetryCount"] == 1 and not task["kubernetes"] for task in tasks.values())
    with pytest.raises(FedFMError, match="execution.kfp.client is for local mode"):
        cluster.with_overrides({"execution.kfp.client.cpu": "4"})


def test_a_run_parameter_changed_in_the_ui_is_what_every_step_runs_with(tiny_config, tmp_path):
    """The init step merges the typed parameters into ``config`` and returns what the other steps get: a
    changed field wins, one left at its compiled value leaves ``config`` (as the user edited it) alone."""
    from fedfm.components.init_federation import init_federation
    from fedfm.config import FederationConfig
    from fedfm.run_parameters import run_parameter_values

    class Output:
        def __init__(self, path):
            self.path, self.metadata = str(path), {}

    cfg = tiny_config(rounds=2)
    compiled = run_parameter_values(cfg)
    edited = cfg.with_overrides({"training.batch_size": 4}).as_dict()  # changed in `config` itself
    given = {**compiled, "learning_rate": 0.02, "local_steps": 3}  # changed in their own fields
    outputs = {name: Output(tmp_path / name) for name in ("global_adapter", "server_state", "history")}
    run_config, = init_federation(config=edited, run_id="", start_round=1, compiled_rounds=2,
                                  compiled_secure_aggregation=False,
                                  compiled_execution_mode="local", compiled_parameters=compiled, **given, **outputs)
    run = FederationConfig.parse(run_config)
    assert (run.training.learning_rate, run.training.local_steps, run.training.batch_size) == (0.02, 3, 4)
    assert (tmp_path / "global_adapter").exists()


def _check_run(run, cfg):
    assert "\x1b[" not in (run.output / "run.log").read_text()  # kfp.local colours its lines; the log is plain
    history = run.history
    assert [record["round"] for record in history] == list(range(cfg.rounds + 1))
    assert history[0]["clients"] == {}
    for record in history[1:]:
        assert sorted(record["clients"]) == cfg.sampled_clients(record["round"])
        assert record["missing"] == {}
        for client, figures in record["clients"].items():
            assert figures["samples"] > 0 and figures["steps"] == cfg.local_steps_for(client)
            assert math.isfinite(figures["train_loss"]) and figures["bytes_up"] > 0 and figures["bytes_down"] > 0
        assert record["bytes_up"] == sum(c["bytes_up"] for c in record["clients"].values())
        # a round runs from the first client's start to the aggregate: at least the longest training loop
        assert record["round_seconds"] >= max(c["seconds"] for c in record["clients"].values())
        assert sorted(record["eval"]["clients"]) == cfg.client_names  # every tenant evaluates
    metrics = json.loads(run.metrics_path.read_text())
    assert metrics["rounds"] == history
    # the run's config: the one given, checkpointing into the run's directory
    assert metrics["config"] == cfg.with_overrides(
        {"execution.checkpoint_uri": str(run.output.resolve() / "checkpoints")}).as_dict()
    assert run.report_path.stat().st_size > 10_000
    assert (run.adapter_dir / "adapter_model.safetensors").exists()
    assert json.loads((run.adapter_dir / "fedfm.json").read_text())["rounds"] == cfg.rounds


@pytest.mark.parametrize("task", ["classification", "causal-lm"])
def test_two_rounds_three_clients_under_kfp_local(task, tiny_config, tmp_path, request):
    from fedfm.pipelines.local_runner import run_local

    if task == "classification":  # the run test_simulate compares with (tests/conftest.py)
        cfg, run, seen = request.getfixturevalue("classification_pipeline_run")
        # its model lies under .../lib/python3.11/site-packages/: every step loaded it from the path as given
        assert "/python3.11/" in cfg.model.name_or_path
    else:  # the causal-LM run also draws 2 of the 3 clients per round (policy.sample_fraction)
        cfg = tiny_config(task, rounds=2, clients=3, **{"training.local_steps": 6, "policy.sample_fraction": 0.5})
        seen = []
        run = run_local(cfg, tmp_path / "run", on_event=seen.append)
    _check_run(run, cfg)
    if task == "causal-lm":
        assert [len(cfg.sampled_clients(r)) for r in (1, 2)] == [2, 2]
        assert cfg.sampled_clients(1) != cfg.sampled_clients(2)  # a new draw each round (seed 0)
    metric = "accuracy" if task == "classification" else "perplexity"
    assert all(metric in record["eval"]["global"] for record in run.history)
    if task == "causal-lm":  # the tiny LM learns the response format within two rounds
        assert run.history[-1]["eval"]["global"]["loss"] < run.history[0]["eval"]["global"]["loss"]
    finished = {(e["step"], e.get("round"), e.get("client")) for e in seen if e["event"] == "finished"}
    for round_index in (1, 2):
        for client in cfg.sampled_clients(round_index):
            assert ("client_finetune", round_index, client) in finished
        assert ("aggregate", round_index, None) in finished
    assert ("export", None, None) in finished

    from peft import PeftConfig
    assert PeftConfig.from_pretrained(run.adapter_dir).r == cfg.lora.r


def test_centralized_baseline_pools_the_tenants_with_the_same_total_steps(tiny_config, tmp_path):
    from fedfm.pipelines.local_runner import run_local

    cfg = tiny_config(rounds=1, clients=3, centralized=True)
    run = run_local(cfg, tmp_path / "run")
    _check_run(run, cfg)
    assert cfg.sampled_clients(1) == [CENTRALIZED_CLIENT]
    pooled = run.history[1]["clients"][CENTRALIZED_CLIENT]
    assert pooled["steps"] == 3 * cfg.training.local_steps
    assert pooled["samples"] == 192  # every tenant's training rows: 240 rows, 80 % train


def test_a_failing_step_is_reported_by_name_and_nothing_is_overwritten(tiny_config, tmp_path):
    from fedfm.pipelines.local_runner import run_local

    cfg = tiny_config().with_overrides({"model.name_or_path": str(tmp_path / "no-such-model")})
    with pytest.raises(FedFMError, match=r"step init failed: ModelError: cannot load tokenizer .*no-such-model"):
        run_local(cfg, tmp_path / "run")
    assert (tmp_path / "run" / "run.log").exists()
    seen, _ = events.read(tmp_path / "run" / "events.jsonl")  # not retried: it would fail again, after a backoff
    assert [event["event"] for event in seen if event["step"] == "init"] == ["started", "failed"]
    with pytest.raises(FedFMError, match="is not empty; choose a new --output"):
        run_local(tiny_config(), tmp_path / "run")


def test_cli_compile(tiny_config, tmp_path):
    from typer.testing import CliRunner

    from fedfm.cli import app

    runner = CliRunner()
    config_file = tmp_path / "federation.yaml"
    config_file.write_text(yaml.safe_dump(tiny_config().as_dict()))
    result = runner.invoke(app, ["compile", "--config", str(config_file), "--rounds", "4", "--output",
                                 str(tmp_path / "p.yaml")])
    assert result.exit_code == 0, result.output
    assert "4 rounds" in result.output
    from kfp.components import load_component_from_file
    loaded = load_component_from_file(str(tmp_path / "p.yaml"))
    assert loaded.component_spec.inputs["config"].default["rounds"] == 4

    # a strategy, its parameters and norm bounding from flags
    result = runner.invoke(app, ["compile", "--config", str(config_file), "--strategy", "fedadam", "--strategy-params",
                                 '{"eta": 0.05, "tau": 0.01}', "--clip-norm", "2.5", "--output",
                                 str(tmp_path / "adam.yaml")])
    assert result.exit_code == 0, result.output
    strategy = load_component_from_file(str(tmp_path / "adam.yaml")).component_spec.inputs["config"].default["strategy"]
    assert strategy == {"name": "fedadam", "params": {"eta": 0.05, "tau": 0.01}, "clip_norm": 2.5}
    for bad, message in ((["--strategy", "fedsgd"], "strategy.name 'fedsgd' is unknown"),
                         (["--strategy-params", "{eta"], "not JSON")):
        result = runner.invoke(app, ["compile", "--config", str(config_file), *bad, "--output",
                                     str(tmp_path / "bad.yaml")])
        # a FedFMError reaches fedfm's main(), which prints it; a bad flag value is typer's usage error
        assert result.exit_code != 0 and message in result.output + str(result.exception), result.output
    # `fedfm run` from flags: tests/integration/test_pushgateway.py (one run serves both)


def test_server_state_carries_across_rounds_in_the_pipeline(classification_pipeline_run):
    """FedAvgM under kfp.local: each round's aggregate step gets the momentum the last one wrote, so
    every round's global adapter is the rule applied to the round's updates with the carried state."""
    from fedfm.adapters import load_adapter
    from fedfm.head import COUNTS_KEY, per_class_rows
    from fedfm.server_state import load_server_state
    from fedfm.strategies import build_strategy

    cfg, run, _ = classification_pipeline_run  # FedAvgM (tests/conftest.py)
    assert cfg.strategy.name == "fedavgm"
    files = [path for path in (run.output / "kfp").rglob("*") if path.is_file()]
    globals_ = {load_adapter(p).meta.round: load_adapter(p) for p in files
                if p.name in ("global_adapter", "new_global_adapter") and p.parent.name != "export-adapter"}
    updates = [load_adapter(p) for p in files if p.name == "update"]
    states = {r: load_server_state(str(p), "fedavgm") for p in files if p.name == "new_server_state"
              for r in [int(load_server_state(str(p), "fedavgm")["step"])]}
    assert sorted(globals_) == [0, 1, 2] and sorted(states) == [1, 2] and len(updates) == 2 * 3

    strategy, state = build_strategy(cfg.strategy), {}
    for round_index in (1, 2):  # round 2 starts from the momentum round 1 left
        mine = sorted((u for u in updates if u.meta.round == round_index), key=lambda u: u.meta.client)
        # the head's rows are averaged per class (fedfm.head): the rule sees the updates rescaled so
        counts = {u.meta.client: u.meta.metrics[COUNTS_KEY] for u in mine}
        samples = {u.meta.client: u.meta.samples for u in mine}
        mine = per_class_rows(mine, counts, samples, len(cfg.data.labels))
        expected = strategy.aggregate(globals_[round_index - 1].tensors, iter(mine), state)
        for name, value in expected.tensors.items():
            torch.testing.assert_close(globals_[round_index].tensors[name], value)
        state = states[round_index]
        assert set(state) == set(expected.state)
        for key, value in expected.state.items():
            torch.testing.assert_close(state[key], value)
    assert run.history[-1]["round"] == 2
