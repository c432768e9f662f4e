"""Issue 17, finding 1: a tenant's Job holds no credential to the federation's storage, only its own, scoped by
:func:`fedfm.trust.grants.tenant_policy`; tried against an S3 server that enforces signatures and policies
(``tests/enforcing_s3.py``). Tenant A, with everything its Job has, tries what a shared credential allowed
(read B's plain update, replace it, replace a published adapter, read a checkpoint, rewrite the privacy
accountant's record) and is refused each time, while its own work (read the adapter, write its output, read
its own data with its own credential) goes through.
"""

from __future__ import annotations

import fsspec
import fsspec.config
import pytest
from enforcing_s3 import EnforcingS3

from fedfm import storage
from fedfm.errors import StorageError
from fedfm.trust import grants

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")

BUCKET = "fedfm-grants"
STORAGE_URI = f"s3://{BUCKET}/platform"
ROOT = grants.federation_root(STORAGE_URI, "fed")
OWN_DATA = f"s3://{BUCKET}/tenant-a-private/train.csv"  # A's own storage (elsewhere, in real life)


@pytest.fixture(scope="module")
def store():
    server = EnforcingS3(BUCKET)
    try:
        yield server
    finally:
        server.stop()


def _use_settings(monkeypatch, env: dict[str, str]) -> None:
    """Exactly ``env`` as this process's storage settings, as a Job's environment would be."""
    import os

    for key in list(os.environ):
        if key.startswith(("AWS_", "FSSPEC_", grants.ROOT_ENV)):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(fsspec.config, "conf", {})
    fsspec.config.set_conf_env(fsspec.config.conf)
    fsspec.filesystem("s3").invalidate_cache()


def _job_env(store: EnforcingS3, client: str) -> dict[str, str]:
    """What A's Job gets: its own storage credential as its usual variables (from its Secret), and the
    federation's storage credential the platform admin made for it, under the operator's variable names."""
    own = store.user(f"{client}-own", {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": ["s3:GetObject", "s3:PutObject"],
         "Resource": [f"arn:aws:s3:::{BUCKET}/tenant-{client}-private/*"]}]})
    federation = store.user(f"{client}-federation", grants.tenant_policy(STORAGE_URI, "fed", client))
    env = {**own, "AWS_DEFAULT_REGION": "us-east-1", "FSSPEC_S3_ENDPOINT_URL": store.endpoint,
           grants.ROOT_ENV: ROOT}
    for key, value in {**federation, "AWS_ENDPOINT_URL": store.endpoint, "AWS_DEFAULT_REGION": "us-east-1"}.items():
        env[grants.CREDENTIAL_ENV[key]] = value
    return env


def test_a_tenant_reaches_its_own_prefix_and_the_adapters_and_nothing_else(store, monkeypatch):
    objects = {
        "adapter": f"{grants.adapter_store(ROOT)}/0123abcd.safetensors",
        "a input": f"{grants.tenant_prefix(ROOT, 'a')}/runs/r/round-1/secagg/share.keys",
        "b update": f"{grants.tenant_prefix(ROOT, 'b')}/runs/r/round-1/update.safetensors",
        "checkpoint": f"{ROOT}/runs/r/checkpoints/round-0001/global_adapter.safetensors",
        "accountant": f"{ROOT}/runs/r/checkpoints/round-0001/privacy.json",
        "a data": OWN_DATA,
    }
    _use_settings(monkeypatch, store.env)  # the platform writes what a round leaves in storage
    for name, uri in objects.items():
        storage.write_bytes(uri, name.encode())
    job = _job_env(store, "a")
    _use_settings(monkeypatch, job)

    # what A's Job does: read the adapter it starts from, its inputs and its own data; write its output once
    assert storage.read_bytes(objects["adapter"]) == b"adapter"
    assert storage.read_bytes(objects["a input"]) == b"a input"
    assert storage.read_bytes(OWN_DATA) == b"a data"  # its own credential, not the federation's
    output = f"{grants.tenant_prefix(ROOT, 'a')}/runs/r/round-1/update.safetensors"
    storage.write_bytes(output, b"a's update")
    with pytest.raises(StorageError, match="already exists"):
        storage.write_bytes(output, b"again")

    # what a shared credential let A do, each refused by the store, naming the object
    attacks = {
        "read B's update": lambda: storage.read_bytes(objects["b update"]),
        "replace B's update": lambda: storage.write_bytes(objects["b update"], b"forged", overwrite=True),
        "write into B's prefix": lambda: storage.write_bytes(f"{grants.tenant_prefix(ROOT, 'b')}/x", b"x"),
        "replace a published adapter": lambda: storage.write_bytes(objects["adapter"], b"forged", overwrite=True),
        "publish an adapter": lambda: storage.write_bytes(f"{grants.adapter_store(ROOT)}/beef.safetensors", b"x"),
        "read a checkpoint": lambda: storage.read_bytes(objects["checkpoint"]),
        "rewrite the accountant": lambda: storage.write_bytes(objects["accountant"], b"{}", overwrite=True),
    }
    for attack, act in attacks.items():
        with pytest.raises(StorageError, match=r"(?i)(access denied|forbidden|403)") as refused:
            act()
        assert BUCKET in str(refused.value), attack
    # nor does its own credential reach the federation's objects
    from botocore.exceptions import ClientError

    with pytest.raises(ClientError, match="AccessDenied"):
        store.client(job).get_object(Bucket=BUCKET, Key=objects["b update"].split(f"{BUCKET}/", 1)[1])

    _use_settings(monkeypatch, store.env)
    assert storage.read_bytes(objects["b update"]) == b"b update"
    assert storage.read_bytes(objects["adapter"]) == b"adapter"
    assert storage.read_bytes(objects["accountant"]) == b"accountant"
    assert storage.read_bytes(output) == b"a's update"


def test_fedfm_storage_policy_prints_the_policy_for_the_admin_to_give(tmp_path):
    import json

    from typer.testing import CliRunner

    from fedfm.cli import app
    from fedfm.errors import ConfigError

    config = tmp_path / "federation.json"
    config.write_text(json.dumps({"name": "fed", "clients": ["a", "b"], "data": {"labels": ["x", "y"]},
                                  "execution": {"mode": "kubernetes", "storage_uri": STORAGE_URI,
                                                "federation_namespace": "platform"}}))
    printed = CliRunner().invoke(app, ["storage-policy", "--config", str(config), "--client", "a"])
    assert printed.exit_code == 0, printed.output
    assert json.loads(printed.output) == grants.tenant_policy(STORAGE_URI, "fed", "a")
    unknown = CliRunner().invoke(app, ["storage-policy", "--config", str(config), "--client", "z"])
    assert unknown.exit_code != 0 and "client 'z' is not in this federation" in str(unknown.exception or "")
    with pytest.raises(ConfigError, match="S3-compatible"):
        grants.tenant_policy("gs://bucket/fed", "fed", "a")
