"""``ftctl plot --job``: the loss curves of a job on the cluster, read from status with a kubeconfig."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.emulator.runner import EmulatorServer
from tests.install_tools import venv_tool
from tests.served_model import seed_serving_job


def ftctl(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(venv_tool("ftctl")), *args], capture_output=True, text=True, env=env, timeout=120)


def test_plot_job_draws_the_history_from_status(
    emulator_server: EmulatorServer, kube_env: dict[str, str], tmp_path: Path
) -> None:
    seed_serving_job(emulator_server, "bot", "ml", backend=None, history_points=30)
    out = tmp_path / "loss.png"
    proc = ftctl("plot", "--job", "bot", "-n", "ml", "-o", str(out), env=kube_env)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000


def test_plot_job_errors_are_clear(emulator_server: EmulatorServer, kube_env: dict[str, str], tmp_path: Path) -> None:
    seed_serving_job(emulator_server, "fresh", "ml", backend=None, history_points=0, ready=False)
    proc = ftctl("plot", "--job", "fresh", "-n", "ml", "-o", str(tmp_path / "x.png"), env=kube_env)
    assert proc.returncode == 1 and 'FineTuneJob "fresh" has no loss history yet' in proc.stderr
    proc = ftctl("plot", "--job", "absent", "-n", "ml", env=kube_env)
    assert proc.returncode == 1 and 'FineTuneJob "absent" not found in namespace "ml"' in proc.stderr
    proc = ftctl("plot", "--job", "x", "--stage", "y", env=dict(os.environ))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
