"""Model download: atomic (temporary folder + rename), marked complete, never fetched twice, partial ones resumed.

Two stand-ins for the hub, no network: a fetch function that fails halfway (to prove atomicity), and a tiny
HTTP server on 127.0.0.1 speaking the part of the Hugging Face Hub API that ``huggingface_hub`` uses, so the
real client code path runs through ``ftctl worker download``.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from finetune_operator.errors import DownloadError
from finetune_operator.worker import download, markers

FTCTL = str(Path(sys.executable).parent / "ftctl")

FILES = {"config.json": b'{"model_type": "qwen2"}', "model.safetensors": b"\0" * 4096, "tokenizer.json": b"{}"}


class FakeFetch:
    """Writes FILES one by one; fails after ``fail_after`` files; records calls and tokens."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.fail_after = fail_after
        self.calls: list[tuple[str, str | None, Path, str | None]] = []
        self.present_at_start: list[set[str]] = []

    def __call__(self, source: str, revision: str | None, dest: Path, token: str | None) -> str | None:
        self.calls.append((source, revision, dest, token))
        self.present_at_start.append({p.name for p in dest.iterdir()})
        for i, (name, data) in enumerate(FILES.items()):
            if self.fail_after is not None and i >= self.fail_after:
                raise ConnectionError(f"connection reset while fetching {name} (token {token})")
            if not (dest / name).exists():
                (dest / name).write_bytes(data)
        return "abc123"


def test_download_is_atomic_resumes_and_is_never_repeated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "models" / "qwen"
    failing = FakeFetch(fail_after=1)
    monkeypatch.setitem(download.FETCHERS, "huggingface", failing)
    with pytest.raises(DownloadError, match="connection reset") as info:
        download.run_download(source="org/qwen", model_dir=target, environ={"HF_TOKEN": "hf_secret"})
    assert info.value.exit_code == 5
    assert "hf_secret" not in str(info.value)  # the token never reaches messages (and so logs/status)
    assert failing.calls[0][3] == "hf_secret"
    assert not target.exists()  # training can never see a half-downloaded model
    partial = target.with_name(".qwen.partial")
    assert (partial / "config.json").exists()

    ok = FakeFetch()
    monkeypatch.setitem(download.FETCHERS, "huggingface", ok)
    res = download.run_download(source="org/qwen", model_dir=target, environ={})
    assert res.ran
    assert ok.present_at_start == [{"config.json"}]  # resumed in the partial folder, not restarted empty
    assert not partial.exists()
    assert {p.name for p in target.iterdir()} == {*FILES, markers.DOWNLOAD_COMPLETE}
    marker = markers.read_marker(target, markers.DOWNLOAD_COMPLETE)
    assert marker is not None and marker["source"] == "org/qwen" and marker["files"] == len(FILES)

    again = download.run_download(source="org/qwen", model_dir=target, environ={})
    assert not again.ran and len(ok.calls) == 1  # complete: never fetched again


def test_a_folder_the_product_did_not_create_is_never_deleted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model folder without our marker may be anyone's data: refuse, naming it, and touch nothing."""
    target = tmp_path / "qwen"
    target.mkdir()
    (target / "config.json").write_text("{}")
    (target / "notes.txt").write_text("a user's file")
    fetch = FakeFetch()
    monkeypatch.setitem(download.FETCHERS, "huggingface", fetch)
    with pytest.raises(DownloadError, match="not created by the download") as info:
        download.run_download(source="org/qwen", model_dir=target, environ={})
    assert str(target) in str(info.value) and "notes.txt" in str(info.value)
    assert (target / "notes.txt").read_text() == "a user's file" and (target / "config.json").exists()
    assert fetch.calls == []  # refused before fetching anything
    assert not target.with_name(".qwen.partial").exists()


def test_a_dataset_under_the_model_folder_survives(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reported case: model subPath ``team`` and a dataset under ``team/data/`` on the same claim."""
    claim = tmp_path / "claim"
    (claim / "team" / "data").mkdir(parents=True)
    (claim / "team" / "data" / "chat.jsonl").write_text('{"messages": []}\n')
    monkeypatch.setitem(download.FETCHERS, "huggingface", FakeFetch())
    with pytest.raises(DownloadError):
        download.run_download(source="org/qwen", model_dir=claim / "team", environ={})
    assert (claim / "team" / "data" / "chat.jsonl").read_text() == '{"messages": []}\n'


def test_the_whole_claim_is_never_the_download_target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No subPath: the model folder is the claim's mount point; its content (and the claim) must survive."""
    claim = tmp_path / "claim"
    (claim / "other-team").mkdir(parents=True)
    (claim / "other-team" / "weights.bin").write_bytes(b"\1" * 16)
    monkeypatch.setitem(download.FETCHERS, "huggingface", FakeFetch())
    monkeypatch.setattr(download.os.path, "ismount", lambda p: Path(p) == claim)
    with pytest.raises(DownloadError, match="root of a volume"):
        download.run_download(source="org/qwen", model_dir=claim, environ={})
    assert (claim / "other-team" / "weights.bin").read_bytes() == b"\1" * 16


def test_an_empty_folder_is_filled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "qwen"
    target.mkdir()
    monkeypatch.setitem(download.FETCHERS, "huggingface", FakeFetch())
    assert download.run_download(source="org/qwen", model_dir=target, environ={}).ran
    assert markers.read_marker(target, markers.DOWNLOAD_COMPLETE) is not None


def test_other_source_is_downloaded_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fetch = FakeFetch()
    monkeypatch.setitem(download.FETCHERS, "huggingface", fetch)
    download.run_download(source="org/a", model_dir=tmp_path / "m", environ={})
    download.run_download(source="org/b", model_dir=tmp_path / "m", environ={})
    assert [c[0] for c in fetch.calls] == ["org/a", "org/b"]


def test_not_a_model_repository(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fetch(source: str, revision: str | None, dest: Path, token: str | None) -> str | None:
        (dest / "README.md").write_text("a dataset")
        return None

    monkeypatch.setitem(download.FETCHERS, "huggingface", fetch)
    with pytest.raises(DownloadError, match=r"no config\.json"):
        download.run_download(source="org/data", model_dir=tmp_path / "m", environ={})
    assert not (tmp_path / "m").exists()


# ---------------------------------------------------------------------------------------------------------------
# The real huggingface_hub client against a local stand-in of the Hub's HTTP API
# ---------------------------------------------------------------------------------------------------------------

SHA = "0123456789abcdef0123456789abcdef01234567"


class FakeHub(http.server.BaseHTTPRequestHandler):
    repo = "org/tiny"
    requests: list[tuple[str, str, str | None]] = []
    fail_file: str | None = None

    def log_message(self, *args: Any) -> None:
        pass

    def _file(self) -> tuple[str, bytes] | None:
        prefix = f"/{self.repo}/resolve/"
        if not self.path.startswith(prefix):
            return None
        _rev, _, name = self.path[len(prefix) :].partition("/")
        return (name, FILES[name]) if name in FILES else None

    def _send_file_headers(self, name: str, data: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("X-Repo-Commit", SHA)
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()

    def do_HEAD(self) -> None:
        type(self).requests.append(("HEAD", self.path, self.headers.get("Authorization")))
        f = self._file()
        if f is None:
            self.send_error(404)
            return
        self._send_file_headers(*f)

    def do_GET(self) -> None:
        type(self).requests.append(("GET", self.path, self.headers.get("Authorization")))
        if self.path.startswith(f"/api/models/{self.repo}/tree/"):
            tree = [
                {"type": "file", "path": n, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                for n, d in FILES.items()
            ]
            body = json.dumps(tree).encode()
        elif self.path.startswith(f"/api/models/{self.repo}/revision/"):
            body = json.dumps({"id": self.repo, "sha": SHA, "siblings": [{"rfilename": n} for n in FILES]}).encode()
        else:
            body = b""
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
        if f[0] == type(self).fail_file:
            self.send_error(500, "hub hiccup")
            return
        self._send_file_headers(*f)
        self.wfile.write(f[1])


@pytest.fixture()
def fake_hub() -> Iterator[str]:
    FakeHub.requests = []
    FakeHub.fail_file = None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _ftctl_download(hub: str, cfg: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {
        "HF_ENDPOINT": hub,
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_TOKEN": "hf_secret_token",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_ETAG_TIMEOUT": "5",
        "HF_HUB_DOWNLOAD_TIMEOUT": "5",
        "PATH": "/usr/bin:/bin",
        "FT_TERMINATION_LOG": str(tmp_path / "termination-log"),
    }
    return subprocess.run(
        [FTCTL, "worker", "download", "--config", str(cfg)],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def test_ftctl_worker_download_with_huggingface_hub(fake_hub: str, tmp_path: Path) -> None:
    target = tmp_path / "models" / "tiny"
    cfg = tmp_path / "download.yaml"
    cfg.write_text(json.dumps({"source": "org/tiny", "hub": "huggingface", "local_dir": str(target)}))
    (tmp_path / "termination-log").write_text("")

    FakeHub.fail_file = "tokenizer.json"
    failed = _ftctl_download(fake_hub, cfg, tmp_path)
    assert failed.returncode == 5, failed.stderr
    assert "hf_secret_token" not in failed.stderr + failed.stdout
    assert "downloading org/tiny from huggingface failed" in (tmp_path / "termination-log").read_text()
    assert not target.exists()

    FakeHub.fail_file = None
    FakeHub.requests = []
    done = _ftctl_download(fake_hub, cfg, tmp_path)
    assert done.returncode == 0, done.stderr
    assert all((target / n).read_bytes() == d for n, d in FILES.items())
    assert markers.read_marker(target, markers.DOWNLOAD_COMPLETE) is not None
    assert not (target / ".cache").exists()
    gets = [p for m, p, _ in FakeHub.requests if m == "GET" and "/resolve/" in p]
    assert not any(p.endswith("/config.json") for p in gets)  # fetched by the first attempt: resumed
    assert all(auth == "Bearer hf_secret_token" for _, _, auth in FakeHub.requests)

    FakeHub.requests = []
    again = _ftctl_download(fake_hub, cfg, tmp_path)
    assert again.returncode == 0 and FakeHub.requests == []  # complete: the hub is not even asked
