"""What each tenant may do in the federation's storage, and how its Jobs reach it.

The federation's storage holds every tenant's updates and evaluation answers, the messages of secure
aggregation, the published global adapters, the checkpoints and the privacy accountant's record. A tenant
that could read or write all of it could read another tenant's plain update, replace it, replace a published
adapter or rewrite the accountant. So no tenant holds the platform's credential: each holds its own, which
allows exactly this (:func:`tenant_policy`):

- read ``ROOT/adapters/``: the global adapters the pipeline publishes, named by their content hash (a Job
  checks each against its name);
- read and write ``ROOT/tenants/CLIENT/``: where the pipeline puts that client's inputs and where its Jobs
  write their outputs (an update, evaluation counts, secure-aggregation messages). The pipeline takes an
  output back only if it is the object the operator checked (its sha256 in the ClientRound's status).

Nothing else: not another tenant's prefix, not the checkpoints, not a write to the adapters. This is the
model Kubeflow Pipelines uses for its profiles' artifacts (a credential per namespace, a policy per prefix);
the policy is AWS IAM's language, which MinIO, SeaweedFS and Ceph's RGW take as it is.

In a tenant's Job the credential arrives under its own variable names (``FEDFM_FEDERATION_STORAGE_*``,
:data:`CREDENTIAL_ENV`) beside the tenant's own storage credentials (its data's and its state's, the usual
``AWS_*``/``FSSPEC_*`` variables), and :mod:`fedfm.storage` uses it for URIs under ``FEDFM_FEDERATION_STORAGE``
only: the two never mix.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlsplit

from fedfm.errors import ConfigError

ADAPTERS = "adapters"
TENANTS = "tenants"
ROOT_ENV = "FEDFM_FEDERATION_STORAGE"
# The Secret's key (what a MinIO or S3 user sets) -> the variable a tenant's Job reads it from.
CREDENTIAL_ENV = {
    "AWS_ACCESS_KEY_ID": f"{ROOT_ENV}_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY": f"{ROOT_ENV}_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN": f"{ROOT_ENV}_SESSION_TOKEN",
    "AWS_ENDPOINT_URL": f"{ROOT_ENV}_ENDPOINT_URL",
    "AWS_DEFAULT_REGION": f"{ROOT_ENV}_REGION",
}
REQUIRED_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


def federation_root(storage_uri: str, federation: str) -> str:
    """Where a federation's objects live: ``STORAGE_URI/FEDERATION``."""
    return f"{storage_uri.rstrip('/')}/{federation}"


def adapter_store(root: str) -> str:
    return f"{root}/{ADAPTERS}"


def tenant_prefix(root: str, client: str) -> str:
    """The one place in the federation's storage where ``client``'s Jobs may write."""
    return f"{root}/{TENANTS}/{client}"


def tenant_policy(storage_uri: str, federation: str, client: str) -> dict[str, Any]:
    """The IAM policy of ``client``'s credential to the federation's S3-compatible storage (``s3://BUCKET/...``)."""
    parts = urlsplit(storage_uri)
    if parts.scheme not in ("s3", "s3a"):
        raise ConfigError(f"per-tenant storage policies are for S3-compatible storage (s3://BUCKET/PREFIX); "
                          f"{storage_uri!r} is not")
    bucket = parts.netloc
    root = federation_root(parts.path.strip("/"), federation).strip("/")
    adapters, own = adapter_store(root), tenant_prefix(root, client)
    return {
        "Version": "2012-10-17",
        "Statement": [
            {"Sid": "ReadPublishedAdapters", "Effect": "Allow", "Action": ["s3:GetObject"],
             "Resource": [f"arn:aws:s3:::{bucket}/{adapters}/*"]},
            {"Sid": "ReadAndWriteOwnPrefix", "Effect": "Allow", "Action": ["s3:GetObject", "s3:PutObject"],
             "Resource": [f"arn:aws:s3:::{bucket}/{own}/*"]},
            # fsspec asks whether an object exists before it writes one that must not be overwritten, and
            # S3 answers "not found" only to a caller that may list where it would be
            {"Sid": "ListOwnPrefix", "Effect": "Allow", "Action": ["s3:ListBucket"],
             "Resource": [f"arn:aws:s3:::{bucket}"],
             "Condition": {"StringLike": {"s3:prefix": [f"{own}/*", f"{adapters}/*"]}}},
        ],
    }


def granted_options(uri: str, environ: os._Environ | dict[str, str] = os.environ) -> dict[str, Any] | None:
    """The fsspec options of the tenant's credential to the federation's storage, when ``uri`` is in it and
    the Job was given one; None otherwise (the URI is read with the process's own credentials)."""
    root = environ.get(ROOT_ENV, "").rstrip("/")
    if not root or not (uri == root or uri.startswith(root + "/")):
        return None
    value = {key: environ.get(variable) or None for key, variable in CREDENTIAL_ENV.items()}
    if not all(value[key] for key in REQUIRED_KEYS):
        return None
    # every option given, None included, so none is taken from the tenant's own FSSPEC_S3_* settings
    return {"key": value["AWS_ACCESS_KEY_ID"], "secret": value["AWS_SECRET_ACCESS_KEY"],
            "token": value["AWS_SESSION_TOKEN"], "endpoint_url": value["AWS_ENDPOINT_URL"],
            "client_kwargs": {"region_name": value["AWS_DEFAULT_REGION"]}}
