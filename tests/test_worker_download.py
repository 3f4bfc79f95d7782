"""Model download: atomic (temporary folder + rename), marked complete, never fetched twice, partial ones resumed.

Two stand-ins for the hub, no network: a fetch function that fails halfway (to prove atomicity), and the
end-to-end tests' HTTP server on 127.0.0.1 (tests/node_agent/hub.py) speaking the part of the Hub API that
``huggingface_hub`` uses, so the real client code path runs through ``ftctl worker download``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from finetune_operator.errors import DownloadError
from finetune_operator.worker import download, markers
from tests.node_agent.hub import Hub

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
# The real huggingface_hub client against a local stand-in of the Hub's HTTP API (the end-to-end tests' one)
# ---------------------------------------------------------------------------------------------------------------

HUB_TOKEN = "hf_secret_token"


@pytest.fixture()
def fake_hub(tmp_path: Path) -> Iterator[Hub]:
    folder = tmp_path / "hub-repo"
    folder.mkdir()
    for name, data in FILES.items():
        (folder / name).write_bytes(data)
    hub = Hub("org/tiny", folder, HUB_TOKEN).start()
    try:
        yield hub
    finally:
        hub.stop()


def _ftctl_download(hub: str, cfg: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {
        "HF_ENDPOINT": hub,
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_TOKEN": HUB_TOKEN,
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


def test_ftctl_worker_download_with_huggingface_hub(fake_hub: Hub, tmp_path: Path) -> None:
    target = tmp_path / "models" / "tiny"
    cfg = tmp_path / "download.yaml"
    cfg.write_text(json.dumps({"source": "org/tiny", "hub": "huggingface", "local_dir": str(target)}))
    (tmp_path / "termination-log").write_text("")

    fake_hub.fail_file = "tokenizer.json"
    failed = _ftctl_download(fake_hub.url, cfg, tmp_path)
    assert failed.returncode == 5, failed.stderr
    assert HUB_TOKEN not in failed.stderr + failed.stdout
    assert "downloading org/tiny from huggingface failed" in (tmp_path / "termination-log").read_text()
    assert not target.exists()

    fake_hub.fail_file = None
    fake_hub.requests = []
    done = _ftctl_download(fake_hub.url, cfg, tmp_path)
    assert done.returncode == 0, done.stderr
    assert all((target / n).read_bytes() == d for n, d in FILES.items())
    assert markers.read_marker(target, markers.DOWNLOAD_COMPLETE) is not None
    assert not (target / ".cache").exists()
    gets = [p for m, p, _ in fake_hub.requests if m == "GET" and "/resolve/" in p]
    assert not any(p.endswith("/config.json") for p in gets)  # fetched by the first attempt: resumed
    assert fake_hub.requests and all(authorized for _, _, authorized in fake_hub.requests)

    fake_hub.requests = []
    again = _ftctl_download(fake_hub.url, cfg, tmp_path)
    assert again.returncode == 0 and fake_hub.requests == []  # complete: the hub is not even asked
