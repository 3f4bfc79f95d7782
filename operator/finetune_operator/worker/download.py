"""``ftctl worker download``: fetch the base model from a hub into the model volume, once.

The model is fetched into a hidden sibling folder ``.<name>.partial`` and renamed into place after the
completion marker was written into it, so the model folder that training reads is either absent or complete.
A restarted download reuses the partial folder (the hub clients skip files they already have).

Nothing is deleted that the download did not create: its own ``.partial`` staging folder, or a model folder
holding its completion marker (an earlier download of another source or revision), is replaced; an empty
folder is filled; any other non-empty folder (a manual copy, another tool's download, a dataset, the root of a
volume) is refused with an error naming it, before anything is fetched. Validation refuses the specs that
would point the download there (``model.volume`` equal to the claim root or containing a dataset or the
output); this check is what protects the data should one slip through.

Tokens come from the environment only (``HF_TOKEN``; ``MODELSCOPE_API_TOKEN`` for ModelScope), which the
renderer fills from a ``secretKeyRef``; they are never logged and never written to the marker.

Config (``download.yaml``): ``source`` (hub id), ``hub`` (huggingface | modelscope), ``revision``,
``local_dir`` (the model folder). Each can also be given on the command line.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_operator.errors import DownloadError, WorkerError
from finetune_operator.worker import markers

log = logging.getLogger("finetune_operator.worker.download")

#: fetch(source, revision, destination, token) -> resolved revision (commit) or None
Fetcher = Callable[[str, "str | None", Path, "str | None"], "str | None"]


def _fetch_huggingface(source: str, revision: str | None, dest: Path, token: str | None) -> str | None:
    from huggingface_hub import snapshot_download

    snapshot_download(repo_id=source, revision=revision, local_dir=str(dest), token=token)
    return revision


def _fetch_modelscope(source: str, revision: str | None, dest: Path, token: str | None) -> str | None:
    try:
        from modelscope.hub.api import HubApi
        from modelscope.hub.snapshot_download import snapshot_download
    except ImportError as exc:
        raise DownloadError("model.hub is modelscope but the modelscope package is not installed") from exc
    if token:
        HubApi().login(token)
    snapshot_download(source, revision=revision, local_dir=str(dest))
    return revision


#: Hub name -> fetch function (tests replace entries with local stand-ins).
FETCHERS: dict[str, Fetcher] = {"huggingface": _fetch_huggingface, "modelscope": _fetch_modelscope}
TOKEN_ENV = {"huggingface": "HF_TOKEN", "modelscope": "MODELSCOPE_API_TOKEN"}


@dataclass
class DownloadResult:
    model_dir: Path
    summary: dict[str, Any]
    ran: bool


def _check_target(target: Path) -> bool:
    """Whether ``target`` is an earlier download of ours to replace; raise if it is anything else but empty."""
    if os.path.ismount(target):
        raise DownloadError(
            f"model folder {target} is the root of a volume: the download needs a folder of its own "
            "(set spec.model.volume.subPath)"
        )
    if not target.exists() and not target.is_symlink():
        return False
    if target.is_symlink() or not target.is_dir():
        raise DownloadError(f"model folder {target} exists and is not a folder; it is left alone")
    if markers.read_marker(target, markers.DOWNLOAD_COMPLETE) is not None:
        return True
    entries = sorted(p.name for p in target.iterdir())
    if not entries:
        return False
    shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
    raise DownloadError(
        f"model folder {target} is not empty and was not created by the download ({shown}); it is left alone. "
        "Empty it or point spec.model.volume.subPath at a folder of its own; or, if it already holds the model, "
        "remove spec.model.source"
    )


def run_download(
    *,
    source: str,
    model_dir: str | os.PathLike[str],
    hub: str = "huggingface",
    revision: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> DownloadResult:
    """Download ``source`` into ``model_dir`` unless it is already complete (see the module docstring)."""
    env = os.environ if environ is None else environ
    target = Path(model_dir)
    done = markers.read_marker(target, markers.DOWNLOAD_COMPLETE)
    if done is not None and done.get("source") == source and done.get("revision") == revision:
        log.info("model %s is already in %s: nothing to do", source, target)
        return DownloadResult(model_dir=target, summary=done, ran=False)
    if hub not in FETCHERS:
        raise WorkerError(f"unknown hub {hub!r} (expected one of {', '.join(sorted(FETCHERS))})")
    replace = _check_target(target)
    token = env.get(TOKEN_ENV[hub]) or (env.get("HUGGING_FACE_HUB_TOKEN") if hub == "huggingface" else None)
    partial = target.with_name(f".{target.name}.partial")
    partial.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s%s from %s into %s", source, f"@{revision}" if revision else "", hub, target)
    started = time.time()
    try:
        resolved = FETCHERS[hub](source, revision, partial, token)
    except WorkerError:
        raise
    except Exception as exc:  # hub clients raise many types; the message is what the user needs
        text = str(exc)
        if token:
            text = text.replace(token, "***")
        hint = " (gated model? set spec.model.tokenSecretRef)" if "401" in text or "403" in text else ""
        raise DownloadError(f"downloading {source} from {hub} failed: {type(exc).__name__}: {text}{hint}") from exc
    if not (partial / "config.json").is_file():
        raise DownloadError(f"{source} was downloaded but has no config.json: is it a model repository?")
    summary = {
        "source": source,
        "hub": hub,
        "revision": revision,
        "resolvedRevision": resolved,
        "files": sum(1 for p in partial.rglob("*") if p.is_file() and ".cache" not in p.parts),
        "wallSeconds": round(time.time() - started, 3),
        "completedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    shutil.rmtree(partial / ".cache", ignore_errors=True)
    markers.write_marker(partial, summary, markers.DOWNLOAD_COMPLETE)
    if replace:
        log.warning("%s holds an earlier download of another model: replacing it", target)
        shutil.rmtree(target)
    elif target.is_dir():
        target.rmdir()  # empty (checked above); fails rather than delete anything that appeared since
    os.replace(partial, target)
    return DownloadResult(model_dir=target, summary=summary, ran=True)
