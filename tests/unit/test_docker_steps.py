"""`fedfm run --runner docker` before any container runs: what each container sees, and the errors a user
gets when no Docker engine answers or a flag does not fit (tests/cluster/test_docker_runner.py runs it)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedfm.cli import app
from fedfm.config import FederationConfig
from fedfm.errors import FedFMError
from fedfm.pipelines.docker_steps import _mounts, docker_runner


def test_each_local_path_of_the_config_is_mounted_at_its_own_path_inputs_read_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.csv").write_text("text,label\n")
    (tmp_path / "model").mkdir()
    cfg = FederationConfig.parse({
        "model": {"name_or_path": "model"},  # relative: where the user runs fedfm
        "data": {"source": "builtin:topics"},
        "clients": [{"name": "a", "train": "data/a.csv"}, {"name": "b", "train": "s3://bucket/b.csv"},
                    {"name": "c", "train": str(tmp_path / "missing.csv")}],
        "execution": {"checkpoint_uri": f"file://{tmp_path}/ckpt", "client_state_uri": str(tmp_path / "run" / "state")},
    })
    mounts = _mounts(cfg, Path("run"))
    assert mounts == {tmp_path / "run": True, tmp_path / "ckpt": True, tmp_path / "model": False,
                      tmp_path / "data" / "a.csv": False}
    assert (tmp_path / "ckpt").is_dir()  # made here, so that it is this user's

    # an output folder inside a read-only input folder is mounted writable over it; inside a written one, not again
    inside = FederationConfig.parse({"data": {"source": str(tmp_path / "data")},
                                     "execution": {"checkpoint_uri": str(tmp_path / "run" / "ckpt")}})
    assert _mounts(inside, tmp_path / "data" / "run") == {tmp_path / "data": False, tmp_path / "data" / "run": True,
                                                           tmp_path / "run" / "ckpt": True}


def test_no_docker_engine_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/nothing.sock")
    with pytest.raises(FedFMError, match=r"no Docker engine answers at unix://.*nothing\.sock.*podman system service"):
        docker_runner(FederationConfig(), tmp_path, "localhost/fedfm:x", {})


def test_the_runner_flags_that_do_not_fit_are_refused(tmp_path):
    result = CliRunner().invoke(app, ["run", "--image", "localhost/fedfm:x", "--output", str(tmp_path / "a")])
    assert result.exit_code == 2 and "--image is the image of --runner docker" in result.output
    (tmp_path / "b").mkdir()
    result = CliRunner().invoke(app, ["run", "--resume", str(tmp_path / "b"), "--runner", "docker"])
    assert result.exit_code == 2 and "runs its steps as it started" in result.output
    assert not (tmp_path / "a").exists()
