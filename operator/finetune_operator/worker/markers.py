"""Completion markers: the proof that a step finished, written last and atomically.

A step's output folder may hold anything after a crash or a preemption (half-written weights, a checkpoint
without its optimizer state). Only the marker says "done": it is written after everything else, through a
temporary file and ``os.replace`` (atomic on POSIX filesystems, NFS included for a rename inside a folder), so
a reader sees either no marker or a complete one. A re-run that finds the marker does nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

#: Marker of a training stage's output folder and of the merged model folder.
COMPLETE = ".finetune-complete.json"
#: Marker of a downloaded model folder.
DOWNLOAD_COMPLETE = ".finetune-download-complete.json"


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    """Write ``data`` as JSON to ``path`` so that readers never see a partial file."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, sort_keys=True)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def share_with_group(directory: str | os.PathLike[str]) -> None:
    """Give the group read and write access to everything under ``directory`` (folders: search too).

    Why: the pods of a job share their volumes through one group (the pod's ``fsGroup``; the folders are
    setgid), but some libraries create files ``0600`` whatever the umask (safetensors' ``save_file`` does, so
    every adapter and model shard). With DeepSpeedJob pods running as root, the non-root merge pod could then
    not read the adapter a training pod wrote (found by running the pods in their images). Files this process
    does not own are left as they are.
    """
    for root, dirs, files in os.walk(directory):
        for name, bits in [(d, stat.S_IRWXG) for d in dirs] + [(f, stat.S_IRGRP | stat.S_IWGRP) for f in files]:
            path = os.path.join(root, name)
            with contextlib.suppress(OSError):
                mode = os.lstat(path).st_mode
                if not stat.S_ISLNK(mode) and mode & bits != bits:
                    os.chmod(path, stat.S_IMODE(mode) | bits)


def write_marker(directory: str | os.PathLike[str], summary: dict[str, Any], name: str = COMPLETE) -> Path:
    """Mark ``directory`` complete with ``summary``; returns the marker's path.

    What the folder holds is shared with the group first (:func:`share_with_group`): the next step's pod, of
    another user, reads it.
    """
    share_with_group(directory)
    path = Path(directory) / name
    write_json_atomic(path, summary)
    with contextlib.suppress(OSError):
        os.chmod(path, stat.S_IMODE(os.stat(path).st_mode) | stat.S_IRGRP | stat.S_IWGRP)
    return path


def read_marker(directory: str | os.PathLike[str], name: str = COMPLETE) -> dict[str, Any] | None:
    """The marker's summary, or ``None`` when the folder is not (verifiably) complete."""
    path = Path(directory) / name
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
