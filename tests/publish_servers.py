"""Real servers for the publishing tests, started on 127.0.0.1 by the tests themselves.

* OCI: Debian's ``docker-registry`` (the CNCF distribution registry, ``scripts/install-registry.sh``) with
  htpasswd authentication and its storage in a temporary folder.
* S3: moto's server mode (``moto_server``) from its own virtualenv (``scripts/install-moto.sh``).

Each server is started with an explicit free port and awaited by connecting until it answers (the process's
readiness is the event); a server that exits early fails the test with its log.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.install_tools import ROOT, _missing


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _await_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{url}: the server exited ({proc.returncode}): {log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return  # it answers (401 from an authenticated registry is an answer)
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"{url}: no answer after {timeout} s: {log.read_text()[-2000:]}")


@contextmanager
def _process(cmd: list[str], url: str, log: Path, env: dict[str, str] | None = None) -> Iterator[None]:
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        _await_http(url, proc, log)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def find_registry() -> str:
    path = os.environ.get("FT_REGISTRY") or shutil.which("docker-registry") or "/usr/bin/docker-registry"
    if not os.access(path, os.X_OK):
        _missing("docker-registry", "run scripts/install-registry.sh (apt-get install docker-registry)")
    return path


def find_moto_server() -> str:
    path = os.environ.get("FT_MOTO_SERVER") or str(ROOT / ".venv-moto" / "bin" / "moto_server")
    if not os.access(path, os.X_OK):
        _missing("moto_server", "run scripts/install-moto.sh or set FT_MOTO_SERVER")
    return path


@dataclass
class Registry:
    host: str
    username: str
    password: str


def _bcrypt(password: str) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt

        return crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH))


@contextmanager
def oci_registry(workdir: Path, username: str, password: str) -> Iterator[Registry]:
    binary = find_registry()
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "htpasswd").write_text(f"{username}:{_bcrypt(password)}\n")
    config = {
        "version": 0.1,
        "log": {"level": "warn"},
        "storage": {"filesystem": {"rootdirectory": str(workdir / "data")}, "delete": {"enabled": True}},
        "http": {"addr": f"127.0.0.1:{port}"},
        "auth": {"htpasswd": {"realm": "finetune-tests", "path": str(workdir / "htpasswd")}},
    }
    (workdir / "config.yml").write_text(yaml.safe_dump(config))
    with _process([binary, "serve", str(workdir / "config.yml")], f"http://127.0.0.1:{port}/v2/", workdir / "log"):
        yield Registry(host=f"127.0.0.1:{port}", username=username, password=password)


@contextmanager
def s3_server(workdir: Path) -> Iterator[str]:
    binary = find_moto_server()
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(workdir)}
    url = f"http://127.0.0.1:{port}"
    with _process([binary, "-H", "127.0.0.1", "-p", str(port)], f"{url}/moto-api/", workdir / "log", env):
        yield url


@contextmanager
def publish_servers(
    workdir: Path,
    *,
    hub_token: str,
    s3_key_id: str,
    s3_secret: str,
    registry_user: str,
    registry_password: str,
    bucket: str,
) -> Iterator[dict[str, Any]]:
    """All three destinations at once: the stand-in hub (``hub``, ``hub_state``), S3 with ``bucket`` created
    (``s3``, ``s3_client``: a real boto3 client) and an authenticated OCI registry (``registry``)."""
    from tests.hub_standin import serve_hub

    with (
        serve_hub(hub_token) as (hub, state),
        s3_server(workdir / "s3") as s3,
        oci_registry(workdir / "registry", registry_user, registry_password) as registry,
    ):
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=s3,
            aws_access_key_id=s3_key_id,
            aws_secret_access_key=s3_secret,
            region_name="us-east-1",
        )
        client.create_bucket(Bucket=bucket)
        yield {"hub": hub, "hub_state": state, "s3": s3, "s3_client": client, "registry": registry}
