"""``ftctl worker merge``: ``llamafactory-cli export`` of the base model with every adapter, atomically.

The export is written to a hidden sibling folder and renamed into place once it is complete and marked, so the
merged folder that serving points at either does not exist or is a whole model: a merge killed halfway leaves
only the hidden folder, which the next attempt deletes and redoes.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from finetune_operator.errors import ModelNotFoundError, WorkerError
from finetune_operator.worker import markers
from finetune_operator.worker.process import child_path, diagnose, lf_command, run_child
from finetune_operator.worker.train import Interrupted, check_inputs, load_config

log = logging.getLogger("finetune_operator.worker.merge")


@dataclass
class MergeResult:
    export_dir: Path
    summary: dict[str, Any]
    ran: bool


def run_merge(
    config: str | os.PathLike[str],
    *,
    environ: Mapping[str, str] | None = None,
    echo: IO[str] | None = None,
    log_file: str | os.PathLike[str] | None = None,
) -> MergeResult:
    """Merge (see the module docstring). Raises :class:`WorkerError` subclasses."""
    cfg = load_config(config)
    export_dir = Path(str(cfg.get("export_dir") or ""))
    if not str(export_dir) or str(export_dir) == ".":
        raise WorkerError(f"config {config} has no export_dir")
    done = markers.read_marker(export_dir)
    if done is not None:
        log.info("merged model %s is already complete: nothing to do", export_dir)
        return MergeResult(export_dir=export_dir, summary=done, ran=False)
    check_inputs({k: v for k, v in cfg.items() if k != "dataset"})
    if not cfg.get("model_name_or_path"):
        raise ModelNotFoundError(f"config {config} has no model_name_or_path")

    partial = export_dir.with_name(f".{export_dir.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ if environ is None else environ)
    env["PATH"] = child_path(env)
    # Export never needs torchrun; a leftover FORCE_TORCHRUN from the pod's environment must not matter.
    env.pop("FORCE_TORCHRUN", None)
    started = time.time()
    result = run_child(lf_command("export", str(config), [f"export_dir={partial}"]), env, echo=echo, log_file=log_file)
    if result.signal is not None:
        shutil.rmtree(partial, ignore_errors=True)
        raise Interrupted(result.signal)
    if result.returncode != 0:
        shutil.rmtree(partial, ignore_errors=True)
        raise diagnose(result, "merge")
    if not (partial / "config.json").is_file():
        raise WorkerError(f"merge exited 0 but {partial} has no config.json")
    summary = {
        "model": cfg.get("model_name_or_path"),
        "adapters": [a for a in str(cfg.get("adapter_name_or_path") or "").split(",") if a],
        "wallSeconds": round(time.time() - started, 3),
        "completedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    markers.write_marker(partial, summary)
    if export_dir.exists():
        # An unmarked folder is an earlier incomplete attempt (or foreign files): never serve it.
        shutil.rmtree(export_dir)
    os.replace(partial, export_dir)
    log.info("merged model written to %s", export_dir)
    return MergeResult(export_dir=export_dir, summary=summary, ran=True)
