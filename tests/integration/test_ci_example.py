"""The GitHub Actions example (examples/github-actions/fedfm.yml) does what it says: its fedfm steps run
here as written, against the example config, submitting to a KFP API stub; its chart lint passes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import helm_python as helm
import yaml

from kfp_stub import KFPStub

ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = ROOT / "examples" / "github-actions" / "fedfm.yml"


def test_the_workflow_lints_compiles_validates_and_submits(tmp_path):
    workflow = yaml.safe_load(WORKFLOW.read_text())
    steps = {step.get("name"): step for step in workflow["jobs"]["pipeline"]["steps"]}
    assert "helm lint --strict charts/fedfm" in steps["Lint the chart"]["run"]
    lint = helm.lint(ROOT / "charts" / "fedfm", strict=True)
    assert lint["errors"] == [] and not [m for m in lint["messages"] if m["severity"] >= 2]
    assert steps["Submit a run"]["if"] == "github.ref == 'refs/heads/main'"

    # the workflow's own commands, with this environment's fedfm in place of the runner's .venv
    (tmp_path / ".venv").symlink_to(Path(sys.executable).parent.parent)
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    stub = KFPStub()
    env = dict(os.environ, **workflow["env"], KFP_HOST=stub.host, KFP_TOKEN="ci-token", GITHUB_SHA="0123456789abcdef")
    try:
        for name in ("Validate the config", "Compile and validate the pipeline", "Submit a run"):
            result = subprocess.run(["bash", "-eo", "pipefail", "-c", steps[name]["run"]], cwd=tmp_path, env=env,
                                    capture_output=True, text=True, timeout=300)
            assert result.returncode == 0, f"{name}:\n{result.stdout}{result.stderr}"
    finally:
        stub.close()
    compiled = yaml.safe_load((tmp_path / "pipeline.yaml").read_text())
    config = compiled["root"]["inputDefinitions"]["parameters"]["config"]["defaultValue"]
    assert config["execution"]["mode"] == "kubernetes" and config["rounds"] == 5
    assert {e["container"]["image"] for e in compiled["deploymentSpec"]["executors"].values()} == {
        workflow["env"]["IMAGE"]}
    (run,) = stub.runs
    assert run["display_name"] == "ci-01234567" and run["runtime_config"]["parameters"]["config"] == config
    assert stub.experiments == {"ci": run["experiment_id"]}
    assert stub.authorizations == {"Bearer ci-token"}
