"""A stand-in for the Hugging Face Hub: serves one folder as a model repository over the Hub's HTTP API.

Only what ``huggingface_hub.snapshot_download`` calls: the revision and tree APIs, then HEAD/GET of each
file under ``/<repo>/resolve/<revision>/<path>``. Every request must carry ``Authorization: Bearer <token>``
(401 otherwise), so a download that succeeds proves the token travelled from the Secret into the pod.
``fail_file`` makes the GET of one file fail with 500 (a hub hiccup halfway through a download). Used by the
end-to-end tests (through the node agent's ``HF_ENDPOINT``) and by tests/test_worker_download.py.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
from pathlib import Path
from typing import Any

SHA = "0f3c1e5a9b7d2c4e6f8a0b1c3d5e7f9a1b3c5d7e"


class Hub:
    def __init__(self, repo: str, folder: Path, token: str) -> None:
        self.repo, self.folder, self.token = repo, folder, token
        self.requests: list[tuple[str, str, bool]] = []  # (method, path, authorized)
        self.fail_file: str | None = None
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        self.files = files
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _authorized(self) -> bool:
                ok = self.headers.get("Authorization") == f"Bearer {hub.token}"
                hub.requests.append((self.command, self.path, ok))
                if not ok:
                    self.send_error(401, "token missing or wrong")
                return ok

            def _file(self) -> tuple[str, bytes] | None:
                prefix = f"/{hub.repo}/resolve/"
                if not self.path.startswith(prefix):
                    return None
                _rev, _, name = self.path[len(prefix) :].partition("/")
                return (name, hub.files[name]) if name in hub.files else None

            def _headers(self, data: bytes) -> None:
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("X-Repo-Commit", SHA)
                self.send_header("Content-Type", "application/octet-stream")
                self.end_headers()

            def do_HEAD(self) -> None:
                if not self._authorized():
                    return
                f = self._file()
                if f is None:
                    self.send_error(404)
                    return
                self._headers(f[1])

            def do_GET(self) -> None:
                if not self._authorized():
                    return
                body = b""
                if self.path.startswith(f"/api/models/{hub.repo}/tree/"):
                    body = json.dumps(
                        [
                            {"type": "file", "path": n, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                            for n, d in hub.files.items()
                        ]
                    ).encode()
                elif self.path.startswith((f"/api/models/{hub.repo}/revision/", f"/api/models/{hub.repo}?")):
                    body = json.dumps(
                        {"id": hub.repo, "sha": SHA, "siblings": [{"rfilename": n} for n in hub.files]}
                    ).encode()
                if body:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                f = self._file()
                if f is None:
                    self.send_error(404)
                    return
                if f[0] == hub.fail_file:
                    self.send_error(500, "hub hiccup")
                    return
                self._headers(f[1])
                self.wfile.write(f[1])

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True, name="stand-in-hub")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> Hub:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
