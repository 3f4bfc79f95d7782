"""The operator's client: kopf's login (kubeconfig, ServiceAccount, exec plugins) and a re-login on 401.

Against a real HTTP server on 127.0.0.1 that checks bearer tokens, and real kubeconfig files: what is checked
is which credentials reach the server, and that a rotated token is picked up without restarting the operator.
"""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from finetune_operator.controller import kube


class TokenServer(http.server.ThreadingHTTPServer):
    """Answers GETs with a ConfigMap when the bearer token is ``accepted``; 401 otherwise. Records tokens."""

    def __init__(self) -> None:
        self.accepted = "first"
        self.seen: list[str] = []
        self.lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                token = self.headers.get("Authorization", "").removeprefix("Bearer ")
                with server.lock:
                    server.seen.append(token)
                    ok = token == server.accepted
                body = (
                    {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": "n"}}
                    if ok
                    else {"kind": "Status", "reason": "Unauthorized", "message": "bad token", "code": 401}
                )
                data = json.dumps(body).encode()
                self.send_response(200 if ok else 401)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def server() -> Iterator[TokenServer]:
    srv = TokenServer()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def write_kubeconfig(path: Path, url: str, user: dict[str, object]) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": url}}],
                "users": [{"name": "u", "user": user}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    return path


async def test_a_rotated_token_is_picked_up_on_401(
    server: TokenServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_kubeconfig(tmp_path / "kubeconfig", server.url, {"token": "first"})
    monkeypatch.setenv("KUBECONFIG", str(config))
    request, close = await kube.connect(in_cluster=False)
    client = kube.RestKube(request, backoff=0)
    try:
        assert (await client.get("v1", "ConfigMap", "n", "c") or {})["metadata"]["name"] == "c"
        server.accepted = "second"  # the API server now wants the rotated token ...
        write_kubeconfig(config, server.url, {"token": "second"})  # ... which the credentials source has
        assert (await client.get("v1", "ConfigMap", "n", "c") or {})["metadata"]["name"] == "c"
        assert (await client.get("v1", "ConfigMap", "n", "c") or {})["metadata"]["name"] == "c"
    finally:
        await close()
    assert server.seen == ["first", "first", "second", "second"]  # a 401, one re-login, then the new token


async def test_a_token_nobody_accepts_is_an_error_not_a_loop(
    server: TokenServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(write_kubeconfig(tmp_path / "kc", server.url, {"token": "wrong"})))
    request, close = await kube.connect(in_cluster=False)
    try:
        with pytest.raises(kube.ApiError) as err:
            await kube.RestKube(request, backoff=0).get("v1", "ConfigMap", "n", "c")
    finally:
        await close()
    assert err.value.status == 401 and err.value.reason == "Unauthorized"
    assert server.seen == ["wrong", "wrong"]


def test_an_exec_plugin_kubeconfig_logs_in_through_the_plugin(server: TokenServer, tmp_path: Path) -> None:
    """kopf's minimal kubeconfig login has no token for an exec user; the plugin-aware login runs the plugin."""
    plugin = tmp_path / "plugin.py"
    credential = {
        "apiVersion": "client.authentication.k8s.io/v1",
        "kind": "ExecCredential",
        "status": {"token": "from-plugin"},
    }
    plugin.write_text(f"import json; print(json.dumps({credential!r}))\n")
    user = {
        "exec": {
            "apiVersion": "client.authentication.k8s.io/v1",
            "command": sys.executable,
            "args": [str(plugin)],
            "interactiveMode": "Never",
        }
    }
    config = write_kubeconfig(tmp_path / "kc", server.url, user)
    # In a process of its own, as the operator runs: kubernetes_asyncio reads $KUBECONFIG when it is imported.
    code = (
        "import asyncio; from finetune_operator.controller import kube; "
        "info = asyncio.run(kube.login(in_cluster=False)); print(info.token, info.server)"
    )
    env = {**os.environ, "KUBECONFIG": str(config)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)

    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["from-plugin", server.url]


async def test_the_service_account_is_skipped_with_an_explicit_kubeconfig(
    server: TokenServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(write_kubeconfig(tmp_path / "kc", server.url, {"token": "first"})))
    calls: list[str] = []
    monkeypatch.setattr(kube.kopf, "login_with_service_account", lambda **_: calls.append("sa"))

    info = await kube.login(in_cluster=False)
    assert calls == [] and info.token == "first"
    await kube.login(in_cluster=True)
    assert calls == ["sa"]
