"""`fedfm submit` against a KFP API stub at the HTTP boundary (no KFP backend can run here): the real
`kfp.Client` talks to it, and the stub records what arrived. Also `fedfm validate`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kfp_stub import KFPStub

FEDFM = str(Path(sys.executable).parent / "fedfm")


@pytest.fixture
def kfp_stub():
    stub = KFPStub()
    yield stub
    stub.close()


def fedfm(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([FEDFM, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_submit_uploads_what_compile_writes_and_starts_the_run(kfp_stub, tmp_path):
    flags = ["--rounds", "2", "--clients", "3", "--local-steps", "7"]
    compiled = fedfm("compile", *flags, "--output", "pipeline.yaml", "--image", "registry.example/fedfm:1",
                     cwd=tmp_path)
    assert compiled.returncode == 0, compiled.stderr
    submitted = fedfm("submit", *flags, "--host", kfp_stub.host, "--image", "registry.example/fedfm:1",
                      "--experiment", "nightly", "--run-name", "nightly-1", cwd=tmp_path)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    (pipeline,) = kfp_stub.pipelines.values()
    assert pipeline["display_name"] == "fedfm-fedfm"
    assert [v["yaml"] for v in pipeline["versions"]] == [(tmp_path / "pipeline.yaml").read_bytes()]
    (run,) = kfp_stub.runs
    assert run["display_name"] == "nightly-1" and run["experiment_id"] == kfp_stub.experiments["nightly"]
    assert run["pipeline_version_reference"] == {"pipeline_id": "pipeline-1", "pipeline_version_id": "version-1"}
    config = run["runtime_config"]["parameters"]["config"]
    assert config["rounds"] == 2 and len(config["clients"]) == 3 and config["training"]["local_steps"] == 7
    assert config == yaml.safe_load((tmp_path / "pipeline.yaml").read_text())["root"]["inputDefinitions"][
        "parameters"]["config"]["defaultValue"]
    assert f"{kfp_stub.host}/#/runs/details/run-1" in " ".join(submitted.stdout.split())

    # the same YAML again: the pipeline and its version are reused, only a run is added;
    # a changed config uploads a new version of the same pipeline
    again = fedfm("submit", *flags, "--host", kfp_stub.host, "--image", "registry.example/fedfm:1", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    changed = fedfm("submit", "--rounds", "2", "--clients", "3", "--local-steps", "9", "--host", kfp_stub.host,
                    "--image", "registry.example/fedfm:1", cwd=tmp_path)
    assert changed.returncode == 0, changed.stderr
    assert len(kfp_stub.pipelines) == 1 and len(pipeline["versions"]) == 2 and len(kfp_stub.runs) == 3
    assert kfp_stub.runs[1]["pipeline_version_reference"]["pipeline_version_id"] == "version-1"
    assert kfp_stub.runs[2]["pipeline_version_reference"]["pipeline_version_id"] == "version-2"
    assert kfp_stub.runs[2]["runtime_config"]["parameters"]["config"]["training"]["local_steps"] == 9


def test_submit_says_why_kfp_refused(tmp_path):
    stub = KFPStub(refuse_runs=True)
    try:
        result = fedfm("submit", "--rounds", "1", "--host", stub.host, cwd=tmp_path)
    finally:
        stub.close()
    assert result.returncode == 2
    assert f"KFP at {stub.host} refused the submission: 403" in " ".join(result.stderr.split())
    unreachable = fedfm("submit", "--rounds", "1", "--host", "http://127.0.0.1:9", cwd=tmp_path)
    assert unreachable.returncode == 2 and "cannot reach KFP at http://127.0.0.1:9" in unreachable.stderr


def test_submit_says_in_one_line_what_is_wrong_with_the_endpoint_and_uses_a_pods_kfp_token(tmp_path):
    """Issue 18, item 6: an address that is not KFP's API (the UI, a login page) once had its HTML dumped into
    the error, and one that accepted the connection but never answered kept the command waiting for minutes.
    In a Kubeflow Pod the projected KFP token is used when no --token is given."""
    import http.server
    import socket
    import threading
    import time

    class LoginPage(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            body = b"<!DOCTYPE html><html><body><form>Sign in to Kubeflow</form></body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    page = http.server.ThreadingHTTPServer(("127.0.0.1", 0), LoginPage)
    threading.Thread(target=page.serve_forever, daemon=True).start()
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)  # accepts the connection (in the backlog) and never answers
    stub = KFPStub()
    try:
        html = fedfm("submit", "--rounds", "1", "--host", f"http://127.0.0.1:{page.server_port}", cwd=tmp_path)
        started = time.monotonic()
        hung = fedfm("submit", "--rounds", "1", "--host", f"http://127.0.0.1:{silent.getsockname()[1]}",
                     "--connect-timeout", "1", cwd=tmp_path)
        waited = time.monotonic() - started
        token = tmp_path / "token"
        token.write_text("pod-token\n")
        in_pod = subprocess.run([FEDFM, "submit", "--rounds", "1", "--host", stub.host], cwd=tmp_path, timeout=300,
                                capture_output=True, text=True,
                                env={**os.environ, "KF_PIPELINES_SA_TOKEN_PATH": str(token)})
    finally:
        page.shutdown()
        silent.close()
        stub.close()
    said = " ".join(html.stderr.split())
    assert html.returncode == 2 and "is not the KFP API: its /apis/v2beta1/healthz answered an HTML page" in said
    assert "<html" not in (html.stdout + html.stderr).lower()
    assert hung.returncode == 2 and "did not answer within 1 s (--connect-timeout)" in " ".join(hung.stderr.split())
    assert waited < 60  # the command's start-up and the one second, not urllib's minutes
    assert in_pod.returncode == 0, in_pod.stderr
    assert stub.authorizations == {"Bearer pod-token"}


def test_validate_checks_a_config_and_a_compiled_pipeline(tmp_path):
    assert fedfm("compile", "--rounds", "2", "--output", "p.yaml", cwd=tmp_path).returncode == 0
    ok = fedfm("validate", "--rounds", "2", "--pipeline", "p.yaml", cwd=tmp_path)
    assert ok.returncode == 0 and "pipeline p.yaml: valid" in ok.stdout and "2 round(s)" in ok.stdout
    stale = fedfm("validate", "--rounds", "3", "--pipeline", "p.yaml", cwd=tmp_path)
    assert stale.returncode == 2
    assert "p.yaml is compiled for 2 rounds and the config asks for 3: recompile" in " ".join(stale.stderr.split())
    (tmp_path / "other.yaml").write_text(yaml.safe_dump({"pipelineInfo": {"name": "x"}, "root": {"dag": {}}}))
    other = fedfm("validate", "--pipeline", "other.yaml", cwd=tmp_path)
    assert other.returncode == 2 and "other.yaml is not a" in other.stderr
    bad = fedfm("validate", "--rounds", "0", cwd=tmp_path)
    assert bad.returncode == 2 and "rounds: Input should be greater than or equal to 1" in bad.stderr
