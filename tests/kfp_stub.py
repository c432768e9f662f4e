"""A Kubeflow Pipelines API stub at the HTTP boundary: the v2beta1 endpoints `kfp.Client` uses to upload
a pipeline (or a version) and start a run, recording what arrived. No KFP backend can run here."""

from __future__ import annotations

import json
import threading
import urllib.parse
from email.parser import BytesParser
from email.policy import default as email_policy
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import yaml

API = "/apis/v2beta1"


class KFPStub:
    """The v2beta1 endpoints `kfp.Client` uses to upload a pipeline (or a version) and start a run."""

    def __init__(self, refuse_runs: bool = False):
        self.pipelines: dict[str, dict] = {}   # id -> {"display_name", "versions": [{id, name, yaml}]}
        self.experiments: dict[str, str] = {}  # name -> id
        self.runs: list[dict] = []
        self.requests: list[str] = []
        self.authorizations: set[str] = set()  # the Authorization headers that arrived
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
                stub.authorizations.add(self.headers.get("Authorization", ""))
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
                stub.authorizations.add(self.headers.get("Authorization", ""))
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
