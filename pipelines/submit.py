"""Submit a federated fine-tune to a Kubeflow Pipelines endpoint (``fedfm submit``), through ``kfp.Client``.

The pipeline uploaded is exactly what ``fedfm compile`` writes for the config. A pipeline of that
name that exists already gets a new version, named by the YAML's content hash, unless its latest
version (or one of that name) has the same spec, which the run then reuses. The run gets the config
as its ``config`` parameter.

Before anything is compiled or sent, the endpoint is asked for KFP's health (``/apis/v2beta1/healthz``)
within ``connect_timeout`` seconds: an address that does not answer, one that is not the KFP API (a login
page, the UI's HTML) and one that refuses the credentials each get one line that says so. Without a token,
a Pod with KFP's projected ServiceAccount token (``KF_PIPELINES_SA_TOKEN_PATH``, multi-user Kubeflow) uses
it, as ``kfp.Client`` does.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

from fedfm.config import FederationConfig
from fedfm.errors import SubmitError


@dataclass
class SubmittedRun:
    pipeline_id: str
    version_id: str
    experiment_id: str
    run_id: str
    url: str


HEALTHZ = "/apis/v2beta1/healthz"
# Where a Kubeflow Pod finds its audience-bound token for KFP (the path kfp.Client reads too)
SA_TOKEN_PATH = os.environ.get("KF_PIPELINES_SA_TOKEN_PATH", "/var/run/secrets/kubeflow/pipelines/token")


def submit(cfg: FederationConfig, host: str, *, image: str, pipeline_name: str | None = None,
           experiment: str = "fedfm", namespace: str | None = None, run_name: str | None = None,
           token: str | None = None, start_round: int = 1, connect_timeout: float = 10.0) -> SubmittedRun:
    """Compile ``cfg``, upload it (once per distinct YAML) and start a run; ``start_round`` > 1 resumes the
    run whose checkpoints ``execution.checkpoint_uri`` names."""
    import kfp
    import urllib3
    from kfp_server_api.exceptions import ApiException

    from fedfm.pipelines.federated_finetune import compile_pipeline
    from fedfm.pipelines.federated_finetune import pipeline_name as default_pipeline_name

    token = token or _mounted_token()
    check_endpoint(host, token, connect_timeout)
    name = pipeline_name or default_pipeline_name(cfg)
    with tempfile.TemporaryDirectory() as directory:
        package = Path(directory) / "pipeline.yaml"
        compile_pipeline(cfg, str(package), image)
        version_name = f"{name}-{hashlib.sha256(package.read_bytes()).hexdigest()[:12]}"
        try:
            client = kfp.Client(host=host, namespace=namespace or "kubeflow", existing_token=token)
            pipeline_id = client.get_pipeline_id(name)
            if pipeline_id is None:
                pipeline_id = client.upload_pipeline(str(package), name, namespace=namespace).pipeline_id
                version_id = _versions(client, pipeline_id)[0].pipeline_version_id
            else:
                version_id = _same_version(client, pipeline_id, version_name, yaml.safe_load(package.read_text()))
                if version_id is None:
                    version_id = client.upload_pipeline_version(str(package), pipeline_version_name=version_name,
                                                                pipeline_id=pipeline_id).pipeline_version_id
            experiment_id = client.create_experiment(experiment, namespace=namespace).experiment_id
            run = client.run_pipeline(experiment_id, run_name or f"{cfg.name}-{version_name[-12:]}",
                                      pipeline_id=pipeline_id, version_id=version_id,
                                      params={"config": cfg.as_dict(), "start_round": start_round})
        except ApiException as exc:
            raise SubmitError(f"KFP at {host} refused the submission: {exc.status} {exc.reason}: "
                              f"{(exc.body or '').strip()[:500]}") from None
        except (OSError, urllib3.exceptions.HTTPError) as exc:  # connection refused, DNS, TLS
            raise SubmitError(f"cannot reach KFP at {host}: {exc}") from None
    return SubmittedRun(pipeline_id, version_id, experiment_id, run.run_id,
                        f"{host.rstrip('/')}/#/runs/details/{run.run_id}")


def _mounted_token() -> str | None:
    try:
        return Path(SA_TOKEN_PATH).read_text().strip() or None
    except OSError:
        return None


def check_endpoint(host: str, token: str | None, timeout: float) -> None:
    """Raise SubmitError, in one line, unless ``host`` answers KFP's health check as the KFP API does (JSON)."""
    request = urllib.request.Request(f"{host.rstrip('/')}{HEALTHZ}",
                                     headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body, kind = response.read(65536), response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            raise SubmitError(f"KFP at {host} refused the credentials: {exc.code} {exc.reason} (multi-user Kubeflow "
                              "needs --token or KFP_TOKEN, or a Pod with KFP's ServiceAccount token)") from None
        raise SubmitError(f"{host} is not a KFP v2 API endpoint: {HEALTHZ} answered {exc.code} {exc.reason} (give "
                          "the API's address, e.g. http://ml-pipeline.kubeflow:8888)") from None
    except (OSError, ValueError) as exc:  # refused, DNS, TLS, a timeout (URLError wraps it); ValueError: not a URL
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, TimeoutError):  # socket.timeout is TimeoutError
            raise SubmitError(f"KFP at {host} did not answer within {timeout:g} s (--connect-timeout)") from None
        raise SubmitError(f"cannot reach KFP at {host}: {reason}") from None
    try:
        answer = json.loads(body)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        what = "an HTML page" if b"<html" in body[:1024].lower() else f"{len(body)} bytes of {kind or 'unknown type'}"
        raise SubmitError(f"{host} is not the KFP API: its {HEALTHZ} answered {what}, not KFP's JSON (the UI's or a "
                          "login page's address? give the API's, and behind a login pass --token)")


def _same_version(client, pipeline_id: str, version_name: str, spec: dict) -> str | None:
    """A version of the pipeline that is this YAML: one named by its hash, or the latest if its spec is equal."""
    versions = _versions(client, pipeline_id)
    for version in versions:
        if version.display_name == version_name:
            return version.pipeline_version_id
    if versions:
        latest = client.get_pipeline_version(pipeline_id, versions[0].pipeline_version_id)
        if latest.pipeline_spec == spec:
            return latest.pipeline_version_id
    return None


def _versions(client, pipeline_id: str) -> list:
    return client.list_pipeline_versions(pipeline_id, page_size=100, sort_by="created_at desc").pipeline_versions or []
