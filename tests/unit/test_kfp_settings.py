"""``execution.kfp``: what the compiled pipeline's tasks ask of a Kubeflow Pipelines cluster. The compiled
platform spec is checked in tests/integration/test_pipeline.py; here, the settings a cluster would refuse
are refused before anything compiles, each naming the field."""

from __future__ import annotations

import pytest

from fedfm.config import FederationConfig
from fedfm.errors import ConfigError


@pytest.mark.parametrize(("settings", "message"), [
    ({"client": {"cpu": "four"}}, "execution.kfp.client: cpu 'four' is not a Kubernetes quantity"),
    ({"server": {"memory": "16GB"}}, "execution.kfp.server: memory '16GB' is not a Kubernetes quantity"),
    ({"client": {"accelerator_count": 2}}, "accelerator_count needs accelerator_type"),
    ({"client": {"node_selector": {"gpu pool": "a"}}}, "node_selector key(s) 'gpu pool' are no Kubernetes label"),
    ({"client": {"tolerations": [{"key": "gpu", "effect": "Sometimes"}]}}, "execution.kfp.client.tolerations.0"),
    ({"client": {"volumes": [{"pvc": "Tenant_Data", "mount_path": "/data"}]}}, "pvc 'Tenant_Data' must be"),
    ({"client": {"volumes": [{"pvc": "data", "mount_path": "data"}]}}, "mount_path 'data' must be an absolute"),
    ({"client": {"secrets": [{"name": "s3"}]}}, "secret 's3': give exactly one of env"),
    ({"client": {"secrets": [{"name": "s3", "env": {"key": "AWS KEY"}}]}}, "'AWS KEY' is no environment"),
    ({"client": {"volumes": [{"pvc": "data", "mount_path": "/d"}], "secrets": [{"name": "s", "mount_path": "/d"}]}},
     "mount_path /d is used twice"),
    ({"retries": 11}, "execution.kfp.retries"),
    ({"client": {"gpus": 1}}, "execution.kfp.client.gpus"),
])
def test_settings_a_cluster_would_refuse_are_refused_naming_the_field(settings, message):
    with pytest.raises(ConfigError) as caught:
        FederationConfig.parse({"execution": {"kfp": settings}})
    assert message in str(caught.value).replace("\n  ", ": ").replace("Value error, ", "")


def test_a_run_cannot_switch_the_execution_mode_the_pipeline_was_compiled_for(tiny_config, tmp_path):
    """The tasks' pods were compiled for one mode (local: they train; kubernetes: they launch Jobs), so a run
    whose ``config`` names the other is refused in init, before anything is written."""
    from fedfm.components.init_federation import init_federation
    from fedfm.run_parameters import run_parameter_values

    class Artifact:
        def __init__(self, path):
            self.path, self.metadata = str(path), {}

    cfg = tiny_config(**{"execution.mode": "kubernetes", "execution.storage_uri": str(tmp_path / "store"),
                         "data.labels": ["business", "health", "science", "sports"]})
    values = run_parameter_values(cfg)
    outputs = {name: Artifact(tmp_path / name) for name in ("global_adapter", "server_state", "history")}
    with pytest.raises(ConfigError, match="execution.mode is kubernetes, but this pipeline was compiled for local"):
        init_federation(config=cfg.as_dict(), run_id="", start_round=1, compiled_rounds=cfg.rounds,
                        compiled_secure_aggregation=False, compiled_execution_mode="local",
                        compiled_parameters=values, **values, **outputs)
    assert not any(tmp_path.glob("global_adapter*"))


def test_the_shipped_example_configs_are_valid():
    from pathlib import Path

    from fedfm.config import load_config

    examples = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))
    assert len(examples) >= 2
    configs = {path.name: load_config(path) for path in examples}
    gpu = configs["federation-kfp-gpu.yaml"]
    assert gpu.execution.kfp.client.accelerator_count == 1 and gpu.execution.kfp.retries == 2
    dpo = configs["federation-dpo.yaml"]  # issue 20: the DPO federation that starts from an SFT adapter
    assert dpo.task == "preference" and dpo.model.adapter == "/runs/sft/adapter" and dpo.preference.beta == 0.1
