"""`fedfm submit` against a KFP API stub at the HTTP boundary (no KFP backend can run here): the real
`kfp.Client` talks to it, and the stub records what arrived. Also `fedfm validate`."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import urllib.parse
from email.parser import BytesParser
from email.policy import default as email_policy
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

FEDFM = str(Path(sys.executable).parent / "fedfm")
API = "/apis/v2beta1"


class KFPStub:
    """The v2beta1 endpoints `kfp.Client` uses to upload a pipeline (or a version) and start a run."""

    def __init__(self, refuse_runs: bool = False):
        self.pipelines: dict[str, dict] = {}   # id -> {"display_name", "versions": [{id, name, yaml}]}
        self.experiments: dict[str, str] = {}  # name -> id
        self.runs: list[dict] = []
        self.requests: list[str] = []
        self.refuse_runs = refuse_runs
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                url = urllib.parse.urlparse(self.path)
                query = dict(urllib.parse.parse_qsl(url.query))
                stub.requests.append(f"GET {url.path}")
                if url.path == f"{API}/healthz":
                    return self._answer(200, {"multi_user": False})
                if url.path == f"{API}/pipelines":
                    wanted = _filtered_name(query)
                    found = [{"pipeline_id": pid, "display_name": p["display_name"]}
                             for pid, p in stub.pipelines.items() if p["display_name"] == wanted]
                    return self._answer(200, {"pipelines": found, "total_size": len(found)})
                if url.path.startswith(f"{API}/pipelines/") and "/versions/" in url.path:
                    pipeline_id, version_id = url.path.split("/")[-3], url.path.split("/")[-1]
                    (version,) = [v for v in stub.pipelines[pipeline_id]["versions"] if v["id"] == version_id]
                    return self._answer(200, {"pipeline_id": pipeline_id, "pipeline_version_id": version_id,
                                              "display_name": version["name"],
                                              "pipeline_spec": yaml.safe_load(version["yaml"])})
                if url.path.startswith(f"{API}/pipelines/") and url.path.endswith("/versions"):
                    pipeline_id = url.path.split("/")[-2]
                    versions = [{"pipeline_id": pipeline_id, "pipeline_version_id": v["id"],
                                 "display_name": v["name"]} for v in reversed(stub.pipelines[pipeline_id]["versions"])]
                    return self._answer(200, {"pipeline_versions": versions, "total_size": len(versions)})
                if url.path == f"{API}/experiments":
                    wanted = _filtered_name(query)
                    found = [{"experiment_id": eid, "display_name": name} for name, eid in stub.experiments.items()
                             if name == wanted]
                    return self._answer(200, {"experiments": found, "total_size": len(found)})
                self._answer(404, {"error": f"no route {url.path}"})

            def do_POST(self):
                url = urllib.parse.urlparse(self.path)
                query = dict(urllib.parse.parse_qsl(url.query))
                stub.requests.append(f"POST {url.path}")
                length = int(self.headers.get("Content-Length", 0))
                body = self.rfile.read(length)
                if url.path in (f"{API}/pipelines/upload", f"{API}/pipelines/upload_version"):
                    uploaded = _form_file(self.headers["Content-Type"], body, "uploadfile")
                    if url.path.endswith("/upload"):
                        pipeline_id = f"pipeline-{len(stub.pipelines) + 1}"
                        stub.pipelines[pipeline_id] = {"display_name": query["name"], "versions": []}
                        name = query["name"]
                    else:
                        pipeline_id, name = query["pipelineid"], query["name"]
                    version = {"id": f"version-{sum(len(p['versions']) for p in stub.pipelines.values()) + 1}",
                               "name": name, "yaml": uploaded}
                    stub.pipelines[pipeline_id]["versions"].append(version)
                    if url.path.endswith("/upload"):
                        return self._answer(200, {"pipeline_id": pipeline_id, "display_name": name})
                    return self._answer(200, {"pipeline_id": pipeline_id, "pipeline_version_id": version["id"],
                                              "display_name": name})
                if url.path == f"{API}/experiments":
                    name = json.loads(body)["display_name"]
                    stub.experiments[name] = f"experiment-{len(stub.experiments) + 1}"
                    return self._answer(200, {"experiment_id": stub.experiments[name], "display_name": name})
                if url.path == f"{API}/runs":
                    if stub.refuse_runs:
                        return self._answer(403, {"error": "user cannot create runs in kubeflow-user"})
                    run = json.loads(body)
                    run["run_id"] = f"run-{len(stub.runs) + 1}"
                    stub.runs.append(run)
                    return self._answer(200, {"run_id": run["run_id"], "display_name": run.get("display_name")})
                self._answer(404, {"error": f"no route {url.path}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _filtered_name(query: dict) -> str | None:
    """The name an EQUALS filter asks for (proto JSON: stringValue, or string_value)."""
    predicate = json.loads(query.get("filter", "{}")).get("predicates", [{}])[0]
    return predicate.get("stringValue", predicate.get("string_value"))


def _form_file(content_type: str, body: bytes, field: str) -> bytes:
    """The bytes of one file field of a multipart/form-data body."""
    message = BytesParser(policy=email_policy).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    for part in message.iter_parts():
        if part.get_param("name", header="content-disposition") == field:
            return part.get_payload(decode=True)
    raise AssertionError(f"no {field} in the upload")


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
