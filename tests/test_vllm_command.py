"""The local vLLM command line is the Deployment's: the "same command line" proof, and its building blocks.

No vLLM needed here (these run everywhere); ``test_vllm_serve.py`` starts the real server with the same
commands. The documented mapping between the pod and the local run (``finetune_operator.local.serve``) is:

* ``/mnt/volumes/<claim>``  ->  ``<workdir>/<claim>`` (the resolver);
* ``0.0.0.0:8000``          ->  ``127.0.0.1:<free port>``;
* ``vllm serve MODEL``      ->  ``--vllm`` CMD (``CMD MODEL`` for the CLI, ``CMD --model MODEL`` for the
  api_server module).

Everything else — every argument, in order, and every environment variable — must be identical.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_operator.api.types import FineTuneJob
from finetune_operator.local import serve as ls
from finetune_operator.render import PathResolver, render
from finetune_operator.render.plan import VOLUME_ROOT

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "manifests" / "examples"
SERVE_EXAMPLES = ("local-demo-serve.yaml", "local-demo-serve-lora.yaml", "06-contract-sft-dpo-merge-serve.yaml")
MODULE_CMD = f"{sys.executable} -m {ls.API_SERVER_MODULE}"


def load_job(name: str) -> FineTuneJob:
    return FineTuneJob.model_validate(yaml.safe_load((EXAMPLES / name).read_text(encoding="utf-8")))


def deployment_container(job: FineTuneJob) -> dict[str, Any]:
    """The vLLM container of the Deployment that render() produces for ``job`` (pod paths)."""
    dep = render(job).step("serve").workload
    assert dep["kind"] == "Deployment"
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    return dict(container)


def to_pod(argv: list[str], launcher: list[str], workdir: str, port: int) -> list[str]:
    """Undo the documented local mapping: what the pod would run for this local argv."""
    rest = argv[len(launcher) :]
    if ls.is_api_server_module(launcher):
        assert rest[0] == "--model", rest
        rest = rest[1:]
    out = ["vllm", "serve"]
    for tok in rest:
        tok = tok.replace(workdir, VOLUME_ROOT)
        out.append({ls.LOCAL_HOST: "0.0.0.0", str(port): "8000"}.get(tok, tok))
    return out


# --------------------------------------------------------------------------------------------------
# The proof: rendered Deployment == local command, modulo the documented mapping
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("example", SERVE_EXAMPLES)
@pytest.mark.parametrize("vllm_cmd", ["vllm serve", "/opt/vllm/bin/vllm serve", MODULE_CMD])
def test_local_command_is_the_deployments(example: str, vllm_cmd: str, tmp_path: Path) -> None:
    job = load_job(example)
    container = deployment_container(job)
    workdir = str(tmp_path / "work")
    port = 41234

    local = ls.build_local_command(job, PathResolver(volume_root=workdir), vllm_cmd, port=port)

    launcher = vllm_cmd.split()
    assert local.argv[: len(launcher)] == launcher
    assert to_pod(local.argv, launcher, workdir, port) == container["command"] + container["args"]
    assert local.env == {e["name"]: e["value"] for e in container["env"]}
    # Every local path lies in the workdir: nothing of the pod's filesystem leaks into the local run.
    assert not any(VOLUME_ROOT in tok for tok in local.argv)


def test_proof_holds_for_the_ftctl_render_output(tmp_path: Path) -> None:
    """The same equality against what users get from the CLI (``ftctl render``), not only the library."""
    example = EXAMPLES / "local-demo-serve-lora.yaml"
    out = subprocess.run(
        [str(Path(sys.executable).parent / "ftctl"), "render", "-f", str(example)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    (dep,) = [d for d in yaml.safe_load_all(out) if d and d["kind"] == "Deployment"]
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    local = ls.build_local_command(load_job(example.name), PathResolver(volume_root=str(tmp_path)), port=5555)
    assert to_pod(local.argv, ["vllm", "serve"], str(tmp_path), 5555) == container["command"] + container["args"]
    assert "--enable-lora" in container["args"]


@pytest.mark.parametrize(
    ("example", "mode", "names"),
    [
        ("local-demo-serve.yaml", "merged", ["tiny-chat"]),
        ("local-demo-serve-lora.yaml", "lora", ["tiny-chat-base", "tiny-chat"]),
        ("06-contract-sft-dpo-merge-serve.yaml", "merged", ["support-bot"]),
    ],
)
def test_served_names_and_mode(example: str, mode: str, names: list[str], tmp_path: Path) -> None:
    local = ls.build_local_command(load_job(example), PathResolver(volume_root=str(tmp_path)), port=1)
    assert local.vllm is not None and local.vllm.mode == mode
    assert local.served_models == names


def test_lora_mode_serves_the_adapter_directory_the_stage_wrote(tmp_path: Path) -> None:
    job = load_job("local-demo-serve-lora.yaml")
    local = ls.build_local_command(job, PathResolver(volume_root=str(tmp_path)), port=1)
    assert local.vllm is not None
    adapter = f"{tmp_path}/demo-outputs/local-demo-lora/sft"
    assert local.vllm.lora_modules == (("tiny-chat", adapter),)
    assert ls.option_values(local.argv, "--lora-modules") == [f"tiny-chat={adapter}"]
    assert ls.last_option_value(local.argv, "--max-lora-rank") == "8"
    assert local.argv[2] == f"{tmp_path}/demo-models/tiny-qwen2"  # the base model, positional after `vllm serve`


# --------------------------------------------------------------------------------------------------
# Building blocks (table-driven)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("launcher", "args", "expected"),
    [
        (["vllm", "serve"], ["/m", "--port", "1"], ["vllm", "serve", "/m", "--port", "1"]),
        (["/v/bin/vllm", "serve"], ["/m"], ["/v/bin/vllm", "serve", "/m"]),
        (
            ["py", "-m", ls.API_SERVER_MODULE],
            ["/m", "--port", "1"],
            ["py", "-m", ls.API_SERVER_MODULE, "--model", "/m", "--port", "1"],
        ),
        (
            ["py", "/s/vllm/entrypoints/openai/api_server.py"],
            ["/m"],
            ["py", "/s/vllm/entrypoints/openai/api_server.py", "--model", "/m"],
        ),
        # A --model already in the args is moved, never duplicated.
        (["vllm", "serve"], ["--port", "1", "--model", "/m"], ["vllm", "serve", "/m", "--port", "1"]),
        (["py", "-m", ls.API_SERVER_MODULE], ["--model=/m"], ["py", "-m", ls.API_SERVER_MODULE, "--model", "/m"]),
    ],
)
def test_with_launcher_places_the_model(launcher: list[str], args: list[str], expected: list[str]) -> None:
    assert ls.with_launcher(launcher, args) == expected


def test_with_launcher_needs_a_model() -> None:
    with pytest.raises(ls.ServeError, match="names no model"):
        ls.with_launcher(["vllm", "serve"], ["--port", "1"])


@pytest.mark.parametrize(
    ("args", "flag", "expected"),
    [
        (["m", "--served-model-name", "a", "b", "--port", "1"], "--served-model-name", ["a", "b"]),
        (["m", "--served-model-name=a"], "--served-model-name", ["a"]),
        (["m", "--served-model-name", "a", "--served-model-name", "z"], "--served-model-name", ["z"]),  # last wins
        (["m", "--port", "1"], "--served-model-name", []),
        (["m", "--lora-modules", "x=/a", "y=/b", "--enforce-eager"], "--lora-modules", ["x=/a", "y=/b"]),
    ],
)
def test_option_values(args: list[str], flag: str, expected: list[str]) -> None:
    assert ls.option_values(args, flag) == expected


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["/m"], ["/m"]),  # vLLM serves under the model path when no name is given
        (["/m", "--served-model-name", "n"], ["n"]),
        (["/m", "--served-model-name", "n-base", "--enable-lora", "--lora-modules", "n=/a"], ["n-base", "n"]),
        (["/m", "--lora-modules", '{"name": "j", "path": "/a", "base_model_name": "/m"}'], ["/m", "j"]),
    ],
)
def test_served_models(args: list[str], expected: list[str]) -> None:
    assert ls.served_models(args) == expected


def test_curl_is_pasteable_json() -> None:
    cmd = ls.LocalServeCommand(argv=[], env={}, host="127.0.0.1", port=9, served_models=["it's"])
    out = subprocess.run(
        ["bash", "-c", f"set -- {cmd.curl()}; printf '%s\\n' \"$@\""], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out[:3] == ["curl", "-s", "http://127.0.0.1:9/v1/chat/completions"]
    body = json.loads(out[-1])
    assert body["model"] == "it's" and body["messages"][0]["role"] == "user"


# --------------------------------------------------------------------------------------------------
# Clear errors before anything starts
# --------------------------------------------------------------------------------------------------


def _job_with(example: str, **serve: Any) -> FineTuneJob:
    data = yaml.safe_load((EXAMPLES / example).read_text(encoding="utf-8"))
    data["spec"]["serve"].update(serve)
    return FineTuneJob.model_validate(data)


@pytest.mark.parametrize(
    ("serve_args", "match"),
    [
        (["--port", "9000"], "sets --port 9000"),
        (["--host=0.0.0.0"], "sets --host 0.0.0.0"),
    ],
)
def test_address_overrides_in_serve_args_are_refused(serve_args: list[str], match: str, tmp_path: Path) -> None:
    job = _job_with("local-demo-serve.yaml", args=serve_args)
    with pytest.raises(ls.ServeError, match=match):
        ls.build_local_command(job, PathResolver(volume_root=str(tmp_path)), port=1)


def test_empty_launcher_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ls.ServeError, match="--vllm is empty"):
        ls.build_local_command(load_job("local-demo-serve.yaml"), PathResolver(volume_root=str(tmp_path)), "  ")


def test_stacked_adapters_without_merge_are_refused(tmp_path: Path) -> None:
    data = yaml.safe_load((EXAMPLES / "local-demo-serve.yaml").read_text(encoding="utf-8"))
    data["spec"]["merge"] = {"enabled": False}
    with pytest.raises(ls.ServeError, match="stacked LoRA adapters"):
        ls.build_local_command(FineTuneJob.model_validate(data), PathResolver(volume_root=str(tmp_path)), port=1)


def _fake_outputs(tmp_path: Path, example: str) -> tuple[ls.LocalServeCommand, Path]:
    cmd = ls.build_local_command(load_job(example), PathResolver(volume_root=str(tmp_path)), port=1)
    assert cmd.vllm is not None
    return cmd, Path(cmd.vllm.model)


def test_check_artefacts(tmp_path: Path) -> None:
    cmd, model = _fake_outputs(tmp_path, "local-demo-serve-lora.yaml")
    assert cmd.vllm is not None
    with pytest.raises(ls.ServeError, match=r"has no config\.json"):
        ls.check_artefacts(cmd.vllm)
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    adapter = Path(cmd.vllm.lora_modules[0][1])
    with pytest.raises(ls.ServeError, match=re.escape(f"{adapter} has no adapter_config.json")):
        ls.check_artefacts(cmd.vllm)
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    ls.check_artefacts(cmd.vllm)
    ls.check_artefacts(cmd.vllm, {"adapters": [str(adapter) + "/"]})
    # The runner reporting another adapter than the one vLLM would load is the bug this guards against.
    with pytest.raises(ls.ServeError, match="did not report"):
        ls.check_artefacts(cmd.vllm, {"adapters": [str(tmp_path / "elsewhere")]})


# --------------------------------------------------------------------------------------------------
# Stopping: the whole process group, even children that ignore SIGTERM
# --------------------------------------------------------------------------------------------------

_STUBBORN = textwrap.dedent("""
    import os, signal, sys, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    pid = os.fork()
    if pid == 0:
        time.sleep(600)   # like vLLM's engine-core process
        os._exit(0)
    with open(sys.argv[1], "w") as fifo:   # tell the test the child's pid, then linger
        fifo.write(str(pid))
    time.sleep(600)
""")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie counts as gone: it holds no memory and no port.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ", 1)[1].startswith("Z"))


def test_stop_kills_the_process_group_after_the_grace_period(tmp_path: Path) -> None:
    fifo = tmp_path / "child.pid"
    os.mkfifo(fifo)
    cmd = ls.LocalServeCommand(argv=[sys.executable, "-c", _STUBBORN, str(fifo)], env={}, host="127.0.0.1", port=1)
    proc = ls.VllmProcess(cmd, log_path=tmp_path / "server.log").start()
    try:
        with open(fifo) as f:  # blocks until the server has forked its child
            child = int(f.read())
        assert _alive(child)
        assert os.getpgid(child) == proc.pid != os.getpgid(0)  # its own group, not ours
    finally:
        code = proc.stop(grace=0.5)
    assert code == -signal.SIGKILL  # it ignored SIGTERM, so the grace period ran out
    assert not _alive(child)


def test_wait_healthy_reports_an_early_exit_with_the_log(tmp_path: Path) -> None:
    script = "import sys; print('unrecognized arguments: --bogus', file=sys.stderr); sys.exit(2)"
    cmd = ls.LocalServeCommand(argv=[sys.executable, "-c", script], env={}, host="127.0.0.1", port=ls.free_port())
    with (
        ls.VllmProcess(cmd, log_path=tmp_path / "vllm.log") as proc,
        pytest.raises(ls.ServeError, match=r"(?s)exited with code 2 .*unrecognized arguments: --bogus"),
    ):
        proc.wait_healthy(timeout=60)
