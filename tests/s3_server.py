"""A local S3 server for tests of object storage: moto's server mode on 127.0.0.1.

Ray workers, Serve replicas and Ray Data tasks take their environment from the raylet, which
copies the test process's environment when the session's Ray starts (tests/conftest.py
`ray_session`). A test module on S3 therefore calls `export_s3_env()` when it is imported:
pytest imports every test module before it runs any test, so the standard AWS variables set
there reach every Ray process, as they would reach a cluster's nodes from their environment.
The server itself starts later, in the module's fixture (`running_s3_server`), on the port
reserved here, and is stopped by its pid.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["S3Env", "S3Server", "export_s3_env", "running_s3_server", "unset_aws_env"]

_HOST = "127.0.0.1"
_START_TIMEOUT_S = 60.0
_exported: S3Env | None = None


@dataclass(frozen=True)
class S3Env:
    """The AWS environment a test session runs with: moto accepts any key pair."""

    port: int
    region: str = "us-east-1"

    @property
    def endpoint(self) -> str:
        return f"http://{_HOST}:{self.port}"

    @classmethod
    def on_a_free_port(cls) -> S3Env:
        with socket.socket() as probe:
            probe.bind((_HOST, 0))
            return cls(port=probe.getsockname()[1])

    def variables(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": "raylift-test",
            "AWS_SECRET_ACCESS_KEY": "raylift-test-secret",
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": self.region,
            # No lookups of an EC2 instance role on a machine that has none.
            "AWS_EC2_METADATA_DISABLED": "true",
        }


def export_s3_env() -> S3Env:
    """Reserve a free port for the server and set the AWS variables naming it, once per
    process; call it at import of the test module (see the module docstring)."""
    global _exported
    if _exported is None:
        _exported = S3Env.on_a_free_port()
        for name in (
            "AWS_ENDPOINT_URL_S3",
            "AWS_DEFAULT_REGION",
            "AWS_SESSION_TOKEN",
            "AWS_PROFILE",
        ):
            os.environ.pop(name, None)  # would win over the variables set here
        os.environ.update(_exported.variables())
    return _exported


def unset_aws_env(monkeypatch) -> None:
    """Remove every AWS variable that would win over S3Env.variables() (`monkeypatch`: pytest's)."""
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)


@dataclass
class S3Server:
    env: S3Env
    process: subprocess.Popen

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.env.endpoint, region_name=self.env.region)

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every object key under `prefix` in `bucket`, sorted."""
        pages = (
            self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        )
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


@contextlib.contextmanager
def running_s3_server(env: S3Env) -> Iterator[S3Server]:
    """moto's S3 server on `env`'s port for the body; stopped (by pid) after it."""
    with tempfile.TemporaryDirectory(prefix="raylift-moto-") as folder:
        log = Path(folder) / "moto.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", _HOST, "-p", str(env.port)],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            _wait_until_up(env, process, log)
            yield S3Server(env=env, process=process)
        finally:
            _stop(process)


def _wait_until_up(env: S3Env, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"moto server exited ({process.returncode}): {log.read_text()}")
        try:
            with urllib.request.urlopen(f"{env.endpoint}/moto-api/", timeout=2):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.2)
    _stop(process)
    raise RuntimeError(f"moto server not up on {env.endpoint} in {_START_TIMEOUT_S:.0f} s")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)
