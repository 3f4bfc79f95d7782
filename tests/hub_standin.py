"""A stand-in for a Hugging Face-compatible hub on 127.0.0.1: the part of the Hub HTTP API that
``huggingface_hub`` uses to create a repository, commit files and read them back.

Like the download tests' stand-in (tests/test_worker_download.py), it lets the real client code run without
network. Files are committed as "regular" (inline, base64) git blobs: the stand-in answers ``preupload`` with
``uploadMode: regular`` and the git object id of the file already there, which is exactly what lets the real
client drop unchanged files (the idempotence our publisher relies on). LFS/Xet transfers of large files are the
one part of the protocol it does not speak.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    private: bool
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[str] = field(default_factory=list)

    @property
    def sha(self) -> str:
        return self.commits[-1] if self.commits else "0" * 40


@dataclass
class HubState:
    token: str
    repos: dict[str, Repo] = field(default_factory=dict)
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)


class _Handler(http.server.BaseHTTPRequestHandler):
    state: HubState

    def log_message(self, *args: Any) -> None:
        pass

    def _reply(self, code: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _authorized(self) -> bool:
        self.state.requests.append((self.command, self.path, self.headers.get("Authorization")))
        if self.headers.get("Authorization") != f"Bearer {self.state.token}":
            self._reply(401, {"error": "Invalid credentials in Authorization header"})
            return False
        return True

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _repo(self, prefix: str) -> tuple[str, Repo | None, str]:
        rest = self.path[len(prefix) :].split("?")[0]
        parts = rest.split("/")
        repo_id = "/".join(parts[:2])
        return repo_id, self.state.repos.get(repo_id), "/".join(parts[2:])

    def do_POST(self) -> None:
        if not self._authorized():
            return
        body = self._body()
        host = f"http://{self.headers['Host']}"
        if self.path == "/api/repos/create":
            req = json.loads(body)
            repo_id = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
            if repo_id in self.state.repos:
                self._reply(409, {"error": "You already created this model repo", "url": f"{host}/{repo_id}"})
                return
            self.state.repos[repo_id] = Repo(private=req.get("visibility") == "private")
            self._reply(200, {"url": f"{host}/{repo_id}", "name": repo_id})
            return
        repo_id, repo, rest = self._repo("/api/models/")
        if repo is None:
            self._reply(404, {"error": "Repository not found"})
            return
        if rest.startswith("preupload/"):
            files = json.loads(body)["files"]
            out = [
                {
                    "path": f["path"],
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": git_blob_sha1(repo.files[f["path"]]) if f["path"] in repo.files else None,
                }
                for f in files
            ]
            self._reply(200, {"files": out})
        elif rest.startswith("commit/"):
            for line in body.splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    value = item["value"]
                    repo.files[value["path"]] = base64.b64decode(value["content"])
            sha = hashlib.sha1(json.dumps(sorted((k, git_blob_sha1(v)) for k, v in repo.files.items())).encode())
            repo.commits.append(sha.hexdigest())
            self._reply(200, {"commitUrl": f"{host}/{repo_id}/commit/{repo.sha}", "commitOid": repo.sha})
        else:
            self._reply(404, {"error": f"not supported by the stand-in: {self.path}"})

    def do_GET(self) -> None:
        if not self._authorized():
            return
        if self.path.startswith("/api/models/"):
            repo_id, repo, rest = self._repo("/api/models/")
            if repo is None:
                self._reply(404, {"error": "Repository not found"})
            elif rest.startswith("revision/") or rest == "":
                siblings = [{"rfilename": n} for n in sorted(repo.files)]
                self._reply(200, {"id": repo_id, "sha": repo.sha, "private": repo.private, "siblings": siblings})
            else:
                self._reply(404, {"error": f"not supported by the stand-in: {self.path}"})
            return
        self._reply(404, {"error": "not found"})


@contextmanager
def serve_hub(token: str) -> Iterator[tuple[str, HubState]]:
    """Run the stand-in on 127.0.0.1 (a free port) for the ``with`` block: (endpoint, state)."""
    state = HubState(token=token)
    handler = type("Handler", (_Handler,), {"state": state})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", state
    finally:
        server.shutdown()
        server.server_close()
