"""Worker pods leave group-writable files on shared volumes (pods of one job run as different users)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

FTCTL = str(Path(sys.executable).parent / "ftctl")


def test_worker_creates_group_writable_folders(tmp_path: Path) -> None:
    """A root DeepSpeedJob pod creates ``<output>/<job>/``; the merge pod (another UID, same group) must write
    there. The download step creates the model's parent folders: they come out group-writable."""
    cfg = tmp_path / "download.yaml"
    target = tmp_path / "volume" / "job" / "model"
    cfg.write_text(f"source: org/none\nhub: huggingface\nlocal_dir: {target}\n")
    env = {
        "PATH": os.environ["PATH"],
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "FT_TERMINATION_LOG": str(tmp_path / "termination-log"),
    }
    old = os.umask(0o022)
    try:
        proc = subprocess.run(
            [FTCTL, "worker", "download", "--config", str(cfg)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        os.umask(old)
    assert proc.returncode != 0  # offline: the download itself fails, after the folders were made
    made = tmp_path / "volume" / "job"
    assert made.is_dir(), proc.stderr
    assert stat.S_IMODE(made.stat().st_mode) & 0o020, oct(made.stat().st_mode)


def test_a_completed_folder_is_shared_with_the_group(tmp_path: Path) -> None:
    """safetensors writes 0600 whatever the umask; the marker makes the folder group-readable for the next
    step's pod (a non-root merge pod reading what a root DeepSpeedJob pod trained)."""
    import stat

    import torch
    from safetensors.torch import save_file

    from finetune_operator.worker import markers

    out = tmp_path / "sft"
    (out / "checkpoint-2").mkdir(parents=True)
    os.chmod(out / "checkpoint-2", 0o700)
    save_file({"w": torch.zeros(1)}, str(out / "adapter_model.safetensors"))
    assert stat.S_IMODE(os.stat(out / "adapter_model.safetensors").st_mode) & stat.S_IRGRP == 0
    marker = markers.write_marker(out, {"stage": "sft"})
    for path in (out / "adapter_model.safetensors", marker):
        assert stat.S_IMODE(os.stat(path).st_mode) & (stat.S_IRGRP | stat.S_IWGRP) == stat.S_IRGRP | stat.S_IWGRP
    assert stat.S_IMODE(os.stat(out / "checkpoint-2").st_mode) & stat.S_IRWXG == stat.S_IRWXG
