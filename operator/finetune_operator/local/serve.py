"""Serve a FineTuneJob's result on this machine with vLLM, using the Deployment's own command line.

Why the same command line: the step users most often find broken elsewhere is the last one — the merged
model or the LoRA adapters the pipeline wrote are not what the server loads (adapters silently missing,
a wrong path, a served name that differs from what the status says). So ``ftctl run --local`` does not
build its own vLLM invocation: it asks :func:`finetune_operator.render.serve.vllm_command` for the arguments
the Deployment's container runs after ``vllm serve``, rendered with the local
:class:`~finetune_operator.render.plan.PathResolver` (so ``/mnt/volumes/<claim>`` becomes the local folder of
that claim), and changes only two things:

* **how vLLM is started** (``--vllm "CMD"``): vLLM usually lives in its own environment. ``CMD`` replaces
  the container's ``vllm serve``. Two forms are understood: the ``vllm serve`` CLI, which takes the model as
  its first positional argument, and the ``python -m vllm.entrypoints.openai.api_server`` module, which
  takes ``--model``; the positional model is converted for the latter.
* **where it listens**: ``127.0.0.1`` and a free port instead of ``0.0.0.0:8000`` (a laptop is not a pod);
  the renderer takes host and port as parameters, so the arguments keep their order.

Everything else — served model name, LoRA modules, ``--max-lora-rank``, ``serve.args`` and ``serve.env`` —
is passed through untouched; ``tests/test_vllm_command.py`` proves the equality against the rendered
Deployment, and ``tests/test_vllm_serve.py`` serves the pipeline's real artefacts with real vLLM.

The server runs in its own process group (``start_new_session``) so that stopping it also stops vLLM's
engine-core child process; Ctrl-C, a failed start and the end of ``--smoke`` all go through :meth:`VllmProcess.stop`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from rich.console import Console
from rich.text import Text

from finetune_operator.api.types import FineTuneJob
from finetune_operator.errors import RenderError
from finetune_operator.render.plan import PathResolver
from finetune_operator.render.serve import VllmCommand

#: How ``--vllm`` is started when not given: the vLLM CLI, as in the vLLM container image.
DEFAULT_VLLM_CMD = "vllm serve"
#: The module form of the OpenAI-compatible server (takes ``--model`` instead of a positional model).
API_SERVER_MODULE = "vllm.entrypoints.openai.api_server"
LOCAL_HOST = "127.0.0.1"
#: Loading a model on CPU takes ~25 s with ``--enforce-eager`` and ~60 s with torch.compile; 70B on GPU
#: takes minutes. Locally the default is generous; the process exiting ends the wait early anyway.
DEFAULT_START_TIMEOUT_S = 600.0
#: Time vLLM gets to shut down (it frees its engine process and shared memory) before it is killed.
DEFAULT_STOP_GRACE_S = 20.0
#: The prompt ``--smoke`` sends to every served model.
SMOKE_PROMPT = "What is two plus three?"
SMOKE_MAX_TOKENS = 16


class ServeError(Exception):
    """vLLM could not be started locally, did not become healthy, or a smoke request failed."""


@dataclass(frozen=True)
class LocalServeCommand:
    """What :func:`build_local_command` produces: the process to start and what it will serve."""

    #: The full argv: the ``--vllm`` launcher followed by the Deployment's vLLM arguments (local paths).
    argv: list[str]
    #: Environment variables the Deployment sets on the container (``serve.env`` and the product's own).
    env: dict[str, str]
    host: str
    port: int
    #: Model names clients can ask for: the served model name, then every LoRA adapter name.
    served_models: list[str] = field(default_factory=list)
    #: The renderer's description (mode, model folder, LoRA modules) the argv was built from.
    vllm: VllmCommand | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def curl(self, model: str | None = None) -> str:
        """A ready-to-paste ``curl`` that asks ``model`` (the first served name by default) one question."""
        body = json.dumps(
            {
                "model": model or (self.served_models[0] if self.served_models else ""),
                "messages": [{"role": "user", "content": SMOKE_PROMPT}],
                "max_tokens": SMOKE_MAX_TOKENS,
            }
        )
        return f"curl -s {self.base_url}/v1/chat/completions -H 'Content-Type: application/json' -d {shlex.quote(body)}"


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def free_port(host: str = LOCAL_HOST) -> int:
    """A TCP port nobody listens on right now (the kernel picks it; a tiny race with other processes remains)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def is_api_server_module(launcher: Sequence[str]) -> bool:
    """True when ``launcher`` runs vLLM's api_server module (which wants ``--model``, not a positional)."""
    return any(tok == API_SERVER_MODULE or tok.endswith("/vllm/entrypoints/openai/api_server.py") for tok in launcher)


def split_serve_args(args: Sequence[str]) -> tuple[str | None, list[str]]:
    """Split vLLM CLI arguments into (model, the rest), accepting the positional and the ``--model`` form."""
    rest = list(args)
    for i, tok in enumerate(rest):
        if tok == "--model" and i + 1 < len(rest):
            return rest[i + 1], rest[:i] + rest[i + 2 :]
        if tok.startswith("--model="):
            return tok.split("=", 1)[1], rest[:i] + rest[i + 1 :]
    if rest and not rest[0].startswith("-"):
        return rest[0], rest[1:]
    return None, rest


def with_launcher(launcher: Sequence[str], serve_args: Sequence[str]) -> list[str]:
    """``launcher`` + ``serve_args``, with the model placed the way that launcher expects it."""
    model, rest = split_serve_args(serve_args)
    if model is None:
        raise ServeError("the vLLM command line names no model")
    if is_api_server_module(launcher):
        return [*launcher, "--model", model, *rest]
    return [*launcher, model, *rest]


def option_values(args: Sequence[str], flag: str) -> list[str]:
    """Values of the last ``flag`` in vLLM's argv (``--flag a b`` or ``--flag=a``), as argparse keeps them.

    vLLM's list options (``--served-model-name``, ``--lora-modules``) take one or more values and, like
    every argparse option, a later occurrence replaces an earlier one.
    """
    values: list[str] | None = None
    i = 0
    while i < len(args):
        tok = args[i]
        if tok == flag:
            values = []
            i += 1
            while i < len(args) and not args[i].startswith("--"):
                values.append(args[i])
                i += 1
            continue
        if tok.startswith(flag + "="):
            values = [tok.split("=", 1)[1]]
        i += 1
    return values or []


def last_option_value(args: Sequence[str], flag: str) -> str | None:
    """The value a single-valued ``flag`` ends up with (the last one given), or None."""
    values = option_values(args, flag)
    return values[-1] if values else None


def served_models(serve_args: Sequence[str]) -> list[str]:
    """The names a client can request: the served model name(s), then every LoRA adapter's name.

    vLLM serves the model under ``--served-model-name`` (the model path when absent) and each
    ``--lora-modules`` entry (``name=path`` or a JSON object with ``name``) under its own name.
    """
    model, _ = split_serve_args(serve_args)
    names = option_values(serve_args, "--served-model-name") or ([model] if model else [])
    for entry in option_values(serve_args, "--lora-modules"):
        if entry.lstrip().startswith("{"):
            names.append(str(json.loads(entry)["name"]))
        else:
            names.append(entry.split("=", 1)[0])
    return names


def build_local_command(
    job: FineTuneJob,
    resolver: PathResolver,
    vllm_cmd: str = DEFAULT_VLLM_CMD,
    port: int | None = None,
    host: str = LOCAL_HOST,
) -> LocalServeCommand:
    """The command that serves ``job``'s result locally: the Deployment's, with local paths, host and port.

    ``resolver`` maps claims to local folders (the renderer's default resolver gives the pod paths). Pure:
    it reads no files, so the "same command line" proof runs without any model on disk.
    """
    from finetune_operator.render import serve as render_serve

    launcher = shlex.split(vllm_cmd)
    if not launcher:
        raise ServeError("--vllm is empty: give the command that starts vLLM, e.g. 'vllm serve'")
    port = port if port is not None else free_port(host)
    try:
        vc = render_serve.vllm_command(job, resolver, host=host, port=port)
    except RenderError as exc:
        raise ServeError(str(exc)) from exc
    serve_args = list(vc.args)
    # serve.args are appended last, so a --host/--port there would win and the health check would look
    # at the wrong address: refuse instead of guessing.
    for flag, want in (("--host", host), ("--port", str(port))):
        got = last_option_value(serve_args, flag)
        if got != want:
            raise ServeError(f"spec.serve.args sets {flag} {got}: the local run chooses its own address; remove it")
    return LocalServeCommand(
        argv=with_launcher(launcher, serve_args),
        env=dict(vc.env),
        host=host,
        port=port,
        served_models=served_models(serve_args),
        vllm=vc,
    )


def check_artefacts(vc: VllmCommand, outputs: Mapping[str, Any] | None = None) -> None:
    """Fail before starting vLLM when what it would load is missing or is not what the pipeline produced.

    vLLM's own errors for a missing folder or a LoRA directory without ``adapter_config.json`` arrive after
    ~20 s of start-up and deep in a traceback; these checks take microseconds and name the path.
    ``outputs`` is what the local pipeline reported (``status.outputs`` shape: ``mergedModel``, ``model``,
    ``adapters``); when given, every folder vLLM loads for the fine-tuned model must be one of them, so a
    disagreement between the renderer and the runner fails here instead of serving something else.
    """
    model = Path(vc.model)
    if not (model / "config.json").is_file():
        raise ServeError(f"{vc.mode} model {model} has no config.json: did the pipeline finish?")
    for name, adapter in vc.lora_modules:
        if not (Path(adapter) / "adapter_config.json").is_file():
            raise ServeError(f"LoRA adapter {name!r}: {adapter} has no adapter_config.json")
    if not outputs:
        return
    produced = {str(Path(p)) for key in ("mergedModel", "merged_model", "model") if (p := outputs.get(key))}
    produced |= {str(Path(p)) for p in outputs.get("adapters") or []}
    wanted = [vc.model] if vc.mode != "lora" else [d for _, d in vc.lora_modules]
    for path in wanted:
        if str(Path(path)) not in produced:
            raise ServeError(
                f"vLLM would serve {path}, which the pipeline did not report as an output (outputs: {sorted(produced)})"
            )


# --------------------------------------------------------------------------------------------------
# HTTP (stdlib only: the CLI must not grow a dependency for three requests)
# --------------------------------------------------------------------------------------------------


def http_json(url: str, body: Mapping[str, Any] | None = None, timeout: float = 60.0) -> tuple[int, Any]:
    """GET (or POST ``body`` as JSON) and return (status, decoded JSON or text). Connection errors raise OSError."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    text = raw.decode("utf-8", "replace")
    try:
        return status, json.loads(text) if text else None
    except json.JSONDecodeError:
        return status, text


def health_ok(base_url: str, timeout: float = 2.0) -> bool:
    """True when ``/health`` answers 200 (vLLM answers it only once the engine is up)."""
    try:
        return http_json(f"{base_url}/health", timeout=timeout)[0] == 200
    except OSError:
        return False


def list_models(base_url: str) -> list[str]:
    """Ids ``/v1/models`` reports (base and LoRA adapters alike)."""
    status, body = http_json(f"{base_url}/v1/models", timeout=30)
    if status != 200 or not isinstance(body, dict):
        raise ServeError(f"/v1/models answered {status}: {body!r}")
    return [str(m.get("id")) for m in body.get("data", [])]


def chat(base_url: str, model: str, prompt: str = SMOKE_PROMPT, max_tokens: int = SMOKE_MAX_TOKENS) -> str:
    """One greedy chat completion from ``model``; returns its text, raises :class:`ServeError` on any failure."""
    status, body = http_json(
        f"{base_url}/v1/chat/completions",
        {
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": 0,
        },
        timeout=120,
    )
    if status != 200 or not isinstance(body, dict):
        raise ServeError(f"chat completion for {model!r} answered {status}: {body!r}")
    choices = body.get("choices") or []
    if not choices or "message" not in choices[0]:
        raise ServeError(f"chat completion for {model!r} has no reply: {body!r}")
    if body.get("model") != model:
        raise ServeError(f"asked {model!r} but {body.get('model')!r} answered")
    return str(choices[0]["message"].get("content") or "")


# --------------------------------------------------------------------------------------------------
# The process
# --------------------------------------------------------------------------------------------------


def group_members(pgid: int) -> list[int]:
    """Pids of the live (not zombie) processes of process group ``pgid`` (Linux ``/proc``; [] elsewhere).

    Zombies are left out: they hold neither memory nor ports, and whether they are reaped soon depends on
    who adopted them, which is outside our control.
    """
    members: list[int] = []
    proc_root = Path("/proc")
    if not proc_root.is_dir():
        return members
    for entry in proc_root.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the parenthesised command: state ppid pgrp ...
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


class VllmProcess:
    """A vLLM server in its own process group, with its output in a log file.

    Use as a context manager: leaving the block always stops the whole group (vLLM forks an engine-core
    process that would otherwise keep the port and gigabytes of memory).
    """

    def __init__(
        self,
        cmd: LocalServeCommand,
        log_path: str | os.PathLike[str] | None = None,
        base_env: Mapping[str, str] | None = None,
    ) -> None:
        self.cmd = cmd
        if log_path is None:
            fd, name = tempfile.mkstemp(prefix="vllm-", suffix=".log")
            os.close(fd)
            log_path = name
        self.log_path = Path(log_path)
        self._base_env = dict(os.environ if base_env is None else base_env)
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> VllmProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        env = {**self._base_env, **self.cmd.env}
        try:
            self.proc = subprocess.Popen(
                self.cmd.argv,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            self._log.close()
            raise ServeError(
                f"cannot start vLLM with {shlex.join(self.cmd.argv[:3])}...: {exc}; "
                'choose how vLLM is started with --vllm "CMD"'
            ) from exc
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_healthy(
        self,
        timeout: float = DEFAULT_START_TIMEOUT_S,
        on_tick: Callable[[float], None] | None = None,
        interval: float = 0.5,
    ) -> float:
        """Poll ``/health`` until it answers 200; returns the seconds waited.

        Ends early with :class:`ServeError` (and the log's tail) when the process exits: a bad flag or a
        model vLLM cannot load must not look like a slow start.
        """
        start = time.monotonic()
        while True:
            elapsed = time.monotonic() - start
            if on_tick is not None:
                on_tick(elapsed)
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise ServeError(
                    f"vLLM exited with code {code} before it was healthy; last lines of "
                    f"{self.log_path}:\n{self.log_tail()}"
                )
            if health_ok(self.cmd.base_url):
                return time.monotonic() - start
            if elapsed > timeout:
                raise ServeError(
                    f"vLLM was not healthy after {timeout:.0f} s; last lines of {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(interval)

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace: float = DEFAULT_STOP_GRACE_S) -> int | None:
        """SIGTERM the process group, wait ``grace`` seconds, then SIGKILL it. Returns the exit code."""
        proc = self.proc
        if proc is not None:
            pgid = proc.pid  # start_new_session: the group id is the leader's pid
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=grace)
            # The engine-core child may outlive the leader: always sweep the group, and return only once
            # nothing of it runs any more (SIGKILL is delivered asynchronously), so that the caller may
            # reuse the port and the memory right away.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
            deadline = time.monotonic() + 10
            while group_members(pgid) and time.monotonic() < deadline:
                time.sleep(0.05)
        if self._log is not None:
            self._log.close()
            self._log = None
        return None if proc is None else proc.returncode

    def __enter__(self) -> VllmProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------------
# Entry point for `ftctl run --local` (serve.enabled)
# --------------------------------------------------------------------------------------------------


def smoke_test(base_url: str, models: Sequence[str], console: Console | None = None) -> dict[str, str]:
    """Check ``/v1/models`` lists every name, then ask each one :data:`SMOKE_PROMPT`; returns the replies.

    Raises :class:`ServeError` at the first name that is missing or does not answer (a LoRA adapter that
    was silently not loaded is exactly what this catches).
    """
    listed = list_models(base_url)
    missing = [m for m in models if m not in listed]
    if missing:
        raise ServeError(f"/v1/models does not list {missing} (it lists {listed})")
    replies: dict[str, str] = {}
    for model in models:
        replies[model] = chat(base_url, model)
        if console is not None:
            console.print(Text.assemble("  ", (model, "bold"), f" -> {replies[model]!r}"), soft_wrap=True)
    return replies


def serve(
    job: FineTuneJob,
    resolver: PathResolver,
    outputs: Mapping[str, Any] | None = None,
    vllm_cmd: str = DEFAULT_VLLM_CMD,
    smoke: bool = False,
    *,
    port: int | None = None,
    log_path: str | os.PathLike[str] | None = None,
    start_timeout: float = DEFAULT_START_TIMEOUT_S,
    console: Console | None = None,
) -> int:
    """Start vLLM like the Deployment would, wait for ``/health``, then smoke-test or serve until Ctrl-C.

    This is what ``ftctl run --local`` calls after the pipeline when ``serve.enabled`` is true. Returns the
    exit code: 0 when serving ended by Ctrl-C (or SIGTERM) or every smoke reply came back, 1 otherwise
    (missing artefacts, vLLM failed to start or exited, a served model did not answer).
    """
    console = console or Console(stderr=True)
    try:
        cmd = build_local_command(job, resolver, vllm_cmd, port=port)
        assert cmd.vllm is not None
        check_artefacts(cmd.vllm, outputs)
    except ServeError as exc:
        console.print(Text.assemble(("serve: ", "bold red"), str(exc)))
        return 1
    server = VllmProcess(cmd, log_path=log_path)
    # Pasteable lines: no wrapping, no markup interpretation of paths or JSON.
    console.print(Text.assemble(("serve: ", "bold"), shlex.join(cmd.argv)), soft_wrap=True)
    if cmd.env:
        console.print(
            "  env:   " + " ".join(f"{k}={shlex.quote(v)}" for k, v in cmd.env.items()),
            soft_wrap=True,
            markup=False,
            highlight=False,
        )
    previous = _sigterm_as_interrupt()
    try:
        server.start()
        console.print(f"  log:   {server.log_path}  (pid {server.pid})", soft_wrap=True, markup=False, highlight=False)
        with console.status("starting vLLM", spinner="dots") as status:
            waited = server.wait_healthy(
                start_timeout,
                on_tick=lambda s: status.update(f"starting vLLM on {cmd.base_url} … {s:3.0f} s (waiting for /health)"),
            )
        console.print(f"[green]vLLM is healthy[/green] after {waited:.1f} s ({cmd.vllm.mode} model)")
        console.print(f"  endpoint: {cmd.base_url}/v1", soft_wrap=True, markup=False, highlight=False)
        console.print(f"  models:   {', '.join(cmd.served_models)}", soft_wrap=True, markup=False, highlight=False)
        for model in cmd.served_models:
            console.print(f"  try:      {cmd.curl(model)}", soft_wrap=True, markup=False, highlight=False)
        if smoke:
            console.print("smoke test:")
            smoke_test(cmd.base_url, cmd.served_models, console)
            console.print(f"[green]smoke test passed[/green]: {len(cmd.served_models)} model(s) answered")
            return 0
        console.print("serving; press Ctrl-C to stop")
        proc = server.proc
        assert proc is not None
        while proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1.0)
        console.print(f"[red]vLLM exited[/red] with code {proc.returncode}; last lines of {server.log_path}:")
        console.print(server.log_tail(), markup=False, highlight=False)
        return 1
    except KeyboardInterrupt:
        console.print("stopping vLLM …")
        return 0
    except ServeError as exc:
        console.print(Text.assemble(("serve failed: ", "bold red"), str(exc)))
        return 1
    finally:
        code = server.stop()
        _restore_sigterm(previous)
        if server.proc is not None:
            console.print(f"vLLM stopped (exit code {code})")


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _sigterm_as_interrupt() -> Any:
    """Treat SIGTERM like Ctrl-C while serving, so ``kill``/a supervisor also stops vLLM's process group.

    Only possible in the main thread (Python's rule); elsewhere the caller is responsible.
    """
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_interrupt)


def _restore_sigterm(previous: Any) -> None:
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)
