"""The storage abstraction on object stores, served over HTTP on loopback: S3 (moto's server, reached
the way a MinIO is: an endpoint URL and keys in the environment) and Google Cloud Storage
(gcp-storage-emulator, reached through ``STORAGE_EMULATOR_HOST``).

Cluster mode moves every adapter, update and evaluation through these URIs, so a tenant's Job needs
credentials for the bucket, never the platform's volumes: the last test runs a tenant's
`fedfm client-train` with nothing but URIs and environment variables, as its Job would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from ports import free_ports

from fedfm import storage
from fedfm.adapters import load_adapter
from fedfm.config import FederationConfig
from fedfm.errors import StorageError
from fedfm.federation import initialize

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")


@pytest.fixture(scope="module")
def s3_env():
    """An S3 API on loopback with one bucket; the environment a MinIO user sets (endpoint + keys)."""
    from moto.server import ThreadedMotoServer

    port = free_ports(1)[0]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "fedfm", "AWS_SECRET_ACCESS_KEY": "fedfm-secret", "AWS_DEFAULT_REGION": "us-east-1",
           "FSSPEC_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    import boto3

    boto3.client("s3", endpoint_url=env["FSSPEC_S3_ENDPOINT_URL"], region_name="us-east-1",
                 aws_access_key_id="fedfm", aws_secret_access_key="fedfm-secret").create_bucket(Bucket="fedfm")
    yield env
    server.stop()


@pytest.fixture(scope="module")
def gcs_env():
    from gcp_storage_emulator.server import create_server

    port = free_ports(1)[0]
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket="fedfm")
    server.start()
    yield {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}"}
    server.stop()


@pytest.fixture(params=["s3", "gs"])
def bucket(request, monkeypatch):
    """``(root URI, environment)`` of a fresh prefix in one of the stores, with the environment set."""
    env = request.getfixturevalue("s3_env" if request.param == "s3" else "gcs_env")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    import fsspec.config

    # fsspec reads FSSPEC_* variables once, at import: load them now that they are set
    monkeypatch.setattr(fsspec.config, "conf", {})
    fsspec.config.set_conf_env(fsspec.config.conf)
    fsspec.filesystem(request.param).invalidate_cache()
    return f"{request.param}://fedfm/{request.node.name.split('[')[0]}", env


def test_write_read_size_and_refusal_to_overwrite(bucket):
    root, _ = bucket
    uri = f"{root}/round-1/a.update.safetensors"
    assert not storage.exists(uri)
    storage.write_bytes(uri, b"0123456789")
    assert storage.exists(uri) and storage.read_bytes(uri) == b"0123456789" and storage.size(uri) == 10
    with pytest.raises(StorageError, match=f"{uri} already exists; refusing to overwrite it"):
        storage.write_bytes(uri, b"other")
    assert storage.read_bytes(uri) == b"0123456789"
    storage.write_bytes(uri, b"replaced", overwrite=True)
    assert storage.read_bytes(uri) == b"replaced"
    with pytest.raises(StorageError, match=f"{root}/missing.bin does not exist"):
        storage.read_bytes(f"{root}/missing.bin")


def test_a_tenant_job_trains_from_and_to_the_bucket(bucket, tiny_classifier, tmp_path):
    """`fedfm client-train` as a ClientRound's Job runs it: config in FEDFM_CONFIG, credentials in the
    environment (a Secret's keys), data, global adapter and update all in the bucket."""
    root, env = bucket
    cfg = FederationConfig.parse({
        "name": "stores", "model": {"name_or_path": tiny_classifier, "max_length": 32},
        "data": {"labels": ["business", "health", "science", "sports"], "eval_fraction": 0.25},
        "clients": ["a"], "rounds": 1, "training": {"local_steps": 2, "batch_size": 4}, "lora": {"r": 2, "alpha": 4}})
    from fedfm.builtin_data import load_builtin

    storage.write_bytes(f"{root}/tenant-a/train.csv", load_builtin("topics").head(40).to_csv(index=False).encode())
    initialize(cfg, f"{root}/adapters/round-0.safetensors")
    job_env = dict(os.environ, FEDFM_CONFIG=json.dumps(cfg.as_dict()), HF_HUB_OFFLINE="1", **env)
    fedfm = str(Path(sys.executable).parent / "fedfm")
    result = subprocess.run([fedfm, "client-train", "--client", "a", "--round", "1",
                             "--global-adapter", f"{root}/adapters/round-0.safetensors",
                             "--output", f"{root}/runs/1/a.update.safetensors", "--data", f"{root}/tenant-a/train.csv"],
                            env=job_env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    update = load_adapter(f"{root}/runs/1/a.update.safetensors")
    assert update.meta.kind == "update" and update.meta.client == "a" and update.meta.round == 1
    assert update.meta.samples == 30  # 40 rows, a quarter held out for evaluation
    assert any(float(t.abs().sum()) > 0 for t in update.tensors.values())
    assert list(tmp_path.iterdir()) == []  # nothing touched the Job's local disk
