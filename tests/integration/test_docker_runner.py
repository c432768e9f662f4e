"""`fedfm run --runner docker`: every step of the pipeline in a container of the component image, through a
Docker engine API (here podman's, over the images built here: tests/images.py), gives what `fedfm run` gives."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

FEDFM = str(Path(sys.executable).parent / "fedfm")


def _start(command: str, output: Path, *flags: str, **env: str) -> subprocess.Popen:
    # one thread per step (and for simulate's one process): the same float32 sums in each, on any machine.
    # One round of two tenants runs every kind of step (8 of them) in a container, in half the time of more.
    return subprocess.Popen([FEDFM, command, "--rounds", "1", "--clients", "2", "--output", str(output), *flags],
                            env=dict(os.environ, OMP_NUM_THREADS="1", **env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _metrics(process: subprocess.Popen, output: Path) -> dict:
    printed, _ = process.communicate(timeout=600)
    log = output / "run.log"
    assert process.returncode == 0, printed[-3000:] + (log.read_text()[-3000:] if log.exists() else "")
    return json.loads((output / "metrics.json").read_text())


def test_the_embedded_default_in_containers_gives_what_fedfm_run_gives(component_image, docker_host, tmp_path):
    """The reference is `fedfm simulate` on one thread, which computes what `fedfm run` computes with one
    thread per step, bit for bit (tests/integration/test_simulate.py compares the two), in less time; the two
    runs go side by side."""
    image = component_image
    docker = _start("run", tmp_path / "docker", "--runner", "docker", "--image", image, DOCKER_HOST=docker_host)
    reference = _start("simulate", tmp_path / "reference")
    docker, reference = _metrics(docker, tmp_path / "docker"), _metrics(reference, tmp_path / "reference")

    assert docker["run"]["steps"] == "docker" and docker["run"]["image"] == image
    # the same global accuracy and loss every round, and the same adapters, bit for bit
    assert [r["round"] for r in docker["rounds"]] == [r["round"] for r in reference["rounds"]] == [0, 1]
    for ours, theirs in zip(docker["rounds"], reference["rounds"]):
        assert ours["eval"]["global"] == theirs["eval"]["global"]
        assert ours["adapter_sha256"] == theirs["adapter_sha256"]
    assert docker["rounds"][1]["eval"]["global"]["accuracy"] > docker["rounds"][0]["eval"]["global"]["accuracy"] + 0.3

    # every step ran in a container of that image (kfp.local's DockerRunner says so for each), as this user
    log = (tmp_path / "docker" / "run.log").read_text()
    # init, 2 evaluations, a selection, 2 fine-tunes, an aggregation, the export
    assert log.count("Executing task") == log.count(f"Found image '{image}'") == 8
    written = [path for path in (tmp_path / "docker" / "checkpoints").rglob("*") if path.is_file()]
    assert written and {path.stat().st_uid for path in written} == {os.getuid()}
