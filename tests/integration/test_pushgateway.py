"""`fedfm run --pushgateway`: a local run pushes its metrics to a real Pushgateway (Debian's)."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from prometheus_server import Pushgateway

from fedfm.cli import app


@pytest.fixture
def pushgateway(tmp_path):
    gateway = Pushgateway(tmp_path / "pushgateway")
    yield gateway
    gateway.stop()


def _sample(text: str, name: str, **labels: str) -> float:
    """The value of the sample ``name`` whose labels include ``labels``."""
    for line in text.splitlines():
        match = re.match(rf"^{name}\{{(.*)\}} (\S+)$", line)
        if match and all(f'{key}="{value}"' in match.group(1) for key, value in labels.items()):
            return float(match.group(2))
    raise AssertionError(f"no {name} with {labels} in the Pushgateway's metrics")


@pytest.mark.slow
def test_a_run_from_flags_pushes_its_metrics(pushgateway, tiny_classifier, tmp_path):
    """`fedfm run` configured by flags alone, with --pushgateway: the flags make the run's config, and its
    metrics reach a real Pushgateway."""
    result = CliRunner().invoke(app, [
        "run", "--model", tiny_classifier, "--dataset", "builtin:topics", "--max-samples", "200", "--clients", "2",
        "--partition", "dirichlet:1.0", "--rounds", "2", "--local-steps", "3", "--lora-r", "2", "--seed", "3",
        "--output", str(tmp_path / "run"), "--pushgateway", pushgateway.url])
    assert result.exit_code == 0, result.output
    assert "global accuracy:" in result.output and "summary" in result.output
    assert f"metrics pushed to {pushgateway.url} (job=fedfm, federation=fedfm)" in " ".join(result.output.split())
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["config"]["lora"]["r"] == 2 and metrics["config"]["seed"] == 3
    assert metrics["config"]["data"]["partition"] == "dirichlet:1.0"
    assert sorted(metrics["rounds"][1]["clients"]) == ["tenant-0", "tenant-1"]
    history = metrics["rounds"]
    text = pushgateway.metrics()
    grouping = {"job": "fedfm", "federation": "fedfm"}
    assert _sample(text, "fedfm_rounds_completed", **grouping) == 2
    assert _sample(text, "fedfm_global_eval_accuracy", **grouping) == pytest.approx(
        history[-1]["eval"]["global"]["accuracy"])
    assert _sample(text, "fedfm_client_rounds_total", purpose="Train", outcome="Succeeded", **grouping) == 4
    assert _sample(text, "fedfm_round_duration_seconds_count", **grouping) == 2


def test_an_unreachable_pushgateway_is_refused_before_any_work(tmp_path):
    result = CliRunner().invoke(app, ["run", "--rounds", "1", "--output", str(tmp_path / "run"),
                                      "--pushgateway", "http://127.0.0.1:9"])
    assert result.exit_code != 0
    assert "cannot push metrics to the Pushgateway at http://127.0.0.1:9" in str(result.exception)
    assert not (tmp_path / "run").exists()
