"""An S3 server that enforces who may do what: moto's server in its authenticated mode.

Every request must be signed with the key of a user the server knows, and is allowed only by that user's IAM
policies (moto checks SigV4 signatures and evaluates identity policies, conditions included). The platform is
one user (``admin``, allowed everything); each tenant is another, with the policy
:func:`fedfm.trust.grants.tenant_policy` writes.

moto keeps its state and its authentication switch per process: one server at a time, stopped (which turns
authentication back off) before another test of the same worker uses moto.
"""

from __future__ import annotations

import json
import logging

from ports import free_ports

REGION = "us-east-1"
ALLOW_ALL = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}


class EnforcingS3:
    """``env``: the platform's settings (endpoint and the admin's keys), as a MinIO user sets them."""

    def __init__(self, bucket: str, *, host: str = "127.0.0.1", bind: str = "127.0.0.1"):
        import boto3
        from moto import settings
        from moto.core.authorization import ActionAuthenticatorMixin
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per request in the test's report
        self.bucket = bucket
        port = free_ports(1)[0]
        self.endpoint = f"http://{host}:{port}"
        self.server = ThreadedMotoServer(ip_address=bind, port=port, verbose=False)
        self.server.start()
        self._settings, self._saved = settings, settings.INITIAL_NO_AUTH_ACTION_COUNT
        self._boto3 = boto3
        self._reset()  # nothing left by another server of this process: its users, its buckets
        # the admin is made while the server still answers anyone; from then on, only signed requests
        settings.INITIAL_NO_AUTH_ACTION_COUNT = float("inf")
        admin = self._make_user("admin", ALLOW_ALL, self._iam("anyone", "anyone"))
        settings.INITIAL_NO_AUTH_ACTION_COUNT = 0
        ActionAuthenticatorMixin.request_count = 0
        self.admin = admin
        self.env = {**admin, "AWS_DEFAULT_REGION": REGION, "FSSPEC_S3_ENDPOINT_URL": self.endpoint}
        self.s3 = self.client(admin)
        self.s3.create_bucket(Bucket=bucket)

    def _iam(self, key: str, secret: str):
        return self._boto3.client("iam", endpoint_url=self.endpoint, region_name=REGION,
                                  aws_access_key_id=key, aws_secret_access_key=secret)

    def _make_user(self, name: str, policy: dict, iam) -> dict[str, str]:
        iam.create_user(UserName=name)
        iam.put_user_policy(UserName=name, PolicyName=name, PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}

    def user(self, name: str, policy: dict) -> dict[str, str]:
        """A new user allowed only ``policy``: its keys."""
        return self._make_user(name, policy, self._iam(self.admin["AWS_ACCESS_KEY_ID"],
                                                       self.admin["AWS_SECRET_ACCESS_KEY"]))

    def client(self, keys: dict[str, str]):
        return self._boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION,
                                  aws_access_key_id=keys["AWS_ACCESS_KEY_ID"],
                                  aws_secret_access_key=keys["AWS_SECRET_ACCESS_KEY"])

    def keys(self, prefix: str) -> list[str]:
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]

    def _reset(self) -> None:
        import requests

        requests.post(f"{self.endpoint}/moto-api/reset", timeout=30).raise_for_status()

    def stop(self) -> None:
        try:
            self._reset()
            self.server.stop()
        finally:
            self._settings.INITIAL_NO_AUTH_ACTION_COUNT = self._saved
