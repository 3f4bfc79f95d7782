"""Real vLLM serves exactly what the local pipeline wrote, started with the Deployment's command line.

The pipeline is the one ``ftctl run --local`` runs (the pods' worker code, real LLaMA-Factory on the tiny
model); vLLM is the real CPU build (``scripts/install-vllm.sh``). The command is never written here: it
comes from :func:`finetune_operator.local.serve.build_local_command`, i.e. the renderer's ``vllm_command``
with local paths (``test_vllm_command.py`` proves it equals the rendered Deployment's). Both ways of
starting vLLM are exercised: the api_server module (``--model``) and the ``vllm serve`` console script.

Every server is stopped by its process group in a finalizer, whatever the test did.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_operator.api.types import FineTuneJob
from finetune_operator.local import serve as ls
from finetune_operator.render.plan import PathResolver

pytestmark = [pytest.mark.vllm, pytest.mark.train, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "manifests" / "examples"
MERGED_EXAMPLE = EXAMPLES / "local-demo-serve.yaml"
LORA_EXAMPLE = EXAMPLES / "local-demo-serve-lora.yaml"
#: Generous: a cold CPU start is ~25-60 s, much more on a loaded machine; an exit ends the wait at once.
START_TIMEOUT = 600.0


def vllm_python() -> Path | None:
    """The interpreter of the vLLM environment: ``FT_VLLM_PYTHON``, else ``.venv-vllm`` in the repository."""
    configured = os.environ.get("FT_VLLM_PYTHON")
    candidate = Path(configured) if configured else REPO / ".venv-vllm" / "bin" / "python"
    return candidate if candidate.is_file() and os.access(candidate, os.X_OK) else None


@pytest.fixture(scope="session")
def vllm_py() -> Path:
    py = vllm_python()
    if py is None:
        pytest.skip("no vLLM environment: run scripts/install-vllm.sh (creates .venv-vllm) or set FT_VLLM_PYTHON")
    return py


def load_job(path: Path) -> FineTuneJob:
    return FineTuneJob.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")))


@dataclass(frozen=True)
class Trained:
    """A FineTuneJob whose pipeline ran locally, and where its artefacts are."""

    job: FineTuneJob
    spec_path: Path
    workdir: Path
    resolver: PathResolver
    outputs: dict[str, Any]


@pytest.fixture(scope="session")
def pipeline_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from finetune_operator.local.demo import prepare_demo

    workdir = tmp_path_factory.mktemp("vllm-pipeline")
    prepare_demo(workdir)  # the tiny model and the demo datasets under <workdir>/<claim>
    return workdir


def _train(workdir: Path, spec_path: Path) -> Trained:
    from rich.console import Console

    from finetune_operator.local.runner import LocalOptions, resolver_for, run_local

    job = load_job(spec_path)
    opts = LocalOptions(workdir=workdir, environ={**os.environ, "DISABLE_VERSION_CHECK": "1", "HF_HUB_OFFLINE": "1"})
    result = run_local(job, opts, Console(stderr=True, quiet=True))
    return Trained(job, spec_path, workdir, resolver_for(job, opts), result.outputs)


@pytest.fixture(scope="session")
def merged_run(pipeline_workdir: Path) -> Trained:
    """SFT -> DPO -> merge of the tiny model (``local-demo-serve.yaml``)."""
    return _train(pipeline_workdir, MERGED_EXAMPLE)


@pytest.fixture(scope="session")
def lora_run(pipeline_workdir: Path) -> Trained:
    """One LoRA SFT stage, no merge (``local-demo-serve-lora.yaml``)."""
    return _train(pipeline_workdir, LORA_EXAMPLE)


@pytest.fixture
def stop_later(request: pytest.FixtureRequest) -> Callable[[int], None]:
    """Register a process group to SIGKILL at teardown (a no-op when it is already gone)."""

    def register(pgid: int) -> None:
        def kill() -> None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)

        request.addfinalizer(kill)

    return register


def _models(base_url: str) -> dict[str, dict[str, Any]]:
    status, body = ls.http_json(f"{base_url}/v1/models")
    assert status == 200, body
    return {m["id"]: m for m in body["data"]}


def _group_gone(pgid: int) -> bool:
    """No live process of the group is left (zombies awaiting their adopter's wait() do not count)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return False
    return True


# --------------------------------------------------------------------------------------------------
# Merged mode: api_server module launcher, in-process
# --------------------------------------------------------------------------------------------------


def test_merged_model_is_served(
    merged_run: Trained, vllm_py: Path, tmp_path: Path, stop_later: Callable[[int], None]
) -> None:
    cmd = ls.build_local_command(merged_run.job, merged_run.resolver, f"{vllm_py} -m {ls.API_SERVER_MODULE}")
    assert cmd.vllm is not None and cmd.vllm.mode == "merged"
    merged_dir = merged_run.outputs["mergedModel"]
    assert cmd.vllm.model == merged_dir
    ls.check_artefacts(cmd.vllm, merged_run.outputs)

    with ls.VllmProcess(cmd, log_path=tmp_path / "vllm.log") as server:
        assert server.pid is not None
        stop_later(server.pid)
        server.wait_healthy(START_TIMEOUT)

        assert ls.http_json(f"{cmd.base_url}/health")[0] == 200
        models = _models(cmd.base_url)
        assert list(models) == ["tiny-chat"]
        assert models["tiny-chat"]["root"] == merged_dir  # the folder the merge step wrote, nothing else
        assert models["tiny-chat"]["max_model_len"] == 512  # serve.maxModelLen reached vLLM

        status, body = ls.http_json(
            f"{cmd.base_url}/v1/chat/completions",
            {
                "model": "tiny-chat",
                "messages": [{"role": "user", "content": "What is two plus three?"}],
                "max_tokens": 8,
                "temperature": 0,
            },
        )
        assert status == 200, body
        assert body["model"] == "tiny-chat"
        assert body["usage"]["completion_tokens"] >= 1
        assert isinstance(body["choices"][0]["message"]["content"], str)

        # --smoke's check: every served name answers; a name vLLM does not serve is reported by name.
        assert set(ls.smoke_test(cmd.base_url, cmd.served_models)) == {"tiny-chat"}
        with pytest.raises(ls.ServeError, match=r"does not list \['not-served'\]"):
            ls.smoke_test(cmd.base_url, ["tiny-chat", "not-served"])
        with pytest.raises(ls.ServeError, match="answered 404"):
            ls.chat(cmd.base_url, "not-served")
    assert _group_gone(server.pid)


# --------------------------------------------------------------------------------------------------
# LoRA mode through the product CLI (`vllm serve` console script), stopped with Ctrl-C
# --------------------------------------------------------------------------------------------------


class _Lines:
    """Collect a process's output lines in a thread; wait for a pattern or the process's exit."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.eof = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self.eof = True
            self._changed.notify_all()

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        rx = re.compile(pattern)
        with self._changed:
            found = self._changed.wait_for(lambda: self.eof or any(rx.search(s) for s in self.lines), timeout)
            for s in self.lines:
                if m := rx.search(s):
                    return m
        raise AssertionError(f"{pattern!r} not seen (found={found}, rc={self.proc.poll()}):\n" + self.text())

    def text(self) -> str:
        with self._changed:
            return "\n".join(self.lines)


def test_lora_adapter_is_served_by_ftctl_run_local_and_ctrl_c_stops_it(
    lora_run: Trained, vllm_py: Path, stop_later: Callable[[int], None]
) -> None:
    adapter = lora_run.outputs["adapters"][-1]
    base_model = str(lora_run.resolver.path(lora_run.job.spec.model.volume))
    ftctl = Path(sys.executable).parent / "ftctl"
    proc = subprocess.Popen(
        [
            str(ftctl),
            "run",
            "--local",
            "-f",
            str(lora_run.spec_path),
            "--workdir",
            str(lora_run.workdir),
            "--vllm",
            f"{vllm_py.parent / 'vllm'} serve",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env={**os.environ, "DISABLE_VERSION_CHECK": "1", "HF_HUB_OFFLINE": "1", "COLUMNS": "200"},
    )
    stop_later(proc.pid)
    out = _Lines(proc)
    server_pid = int(out.wait_for(r"\(pid (\d+)\)", 300).group(1))
    stop_later(server_pid)
    base_url = out.wait_for(r"endpoint: (http://127\.0\.0\.1:\d+)/v1", START_TIMEOUT).group(1)
    out.wait_for("serving; press Ctrl-C to stop", 30)

    # The trained stage is complete, so the re-run trained nothing: what is served is what the fixture wrote.
    assert "already complete" in out.text()
    assert ls.http_json(f"{base_url}/health")[0] == 200
    models = _models(base_url)
    assert set(models) == {"tiny-chat-base", "tiny-chat"}
    assert models["tiny-chat"]["root"] == adapter  # the adapter folder the sft stage wrote
    assert models["tiny-chat"]["parent"] == "tiny-chat-base"
    assert models["tiny-chat-base"]["root"] == base_model
    replies = {m: ls.chat(base_url, m, max_tokens=8) for m in ("tiny-chat", "tiny-chat-base")}
    assert all(isinstance(r, str) for r in replies.values())

    os.kill(proc.pid, signal.SIGINT)  # what the terminal sends on Ctrl-C
    assert proc.wait(timeout=120) == 0, out.text()
    out.wait_for("vLLM stopped", 10)
    assert _group_gone(server_pid), "vLLM's process group outlived Ctrl-C"


# --------------------------------------------------------------------------------------------------
# --smoke: one request per served model, then stop; the exit code says whether all answered
# --------------------------------------------------------------------------------------------------


def test_ftctl_run_local_smoke_exits_zero_when_every_model_answers(
    merged_run: Trained, vllm_py: Path, stop_later: Callable[[int], None]
) -> None:
    ftctl = Path(sys.executable).parent / "ftctl"
    proc = subprocess.Popen(
        [
            str(ftctl),
            "run",
            "--local",
            "--smoke",
            "-f",
            str(merged_run.spec_path),
            "--workdir",
            str(merged_run.workdir),
            "--vllm",
            f"{vllm_py} -m {ls.API_SERVER_MODULE}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env={**os.environ, "DISABLE_VERSION_CHECK": "1", "HF_HUB_OFFLINE": "1", "COLUMNS": "200"},
    )
    stop_later(proc.pid)
    out = _Lines(proc)
    server_pid = int(out.wait_for(r"\(pid (\d+)\)", 300).group(1))
    stop_later(server_pid)
    assert proc.wait(timeout=START_TIMEOUT + 120) == 0, out.text()
    text = out.text()
    assert re.search(r"^\s+tiny-chat -> '.*'$", text, re.M), text
    assert "smoke test passed: 1 model(s) answered" in text
    assert _group_gone(server_pid)
