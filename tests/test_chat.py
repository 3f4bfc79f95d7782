"""``ftctl chat`` against real vLLM (CPU) serving the tiny model: directly, and through the emulated API
server's Service proxy with a kubeconfig, as a user on a laptop would; plus every way it can refuse."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from finetune_operator.access.openai import ChatError, SSEDecoder, chat_request, stream_chat
from tests.emulator.runner import EmulatorServer
from tests.install_tools import venv_tool
from tests.served_model import ServedModel, seed_serving_job


def ftctl(*args: str, env: dict[str, str] | None = None, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(venv_tool("ftctl")), *args],
        capture_output=True,
        text=True,
        env=env or dict(os.environ),
        input=stdin if stdin is not None else "",
        timeout=300,
        check=False,
    )


# ------------------------------------------------------------------------------------------------ protocol


def test_sse_decoder_reassembles_events_split_anywhere() -> None:
    stream = (
        b'data: {"choices":[{"delta":{"role":"assistant"}}]}\n\n'
        b'data: {"choices":[{"delta":{"content":"Hel"}}]}\n\n'
        b": keep-alive comment\n\n"
        b'data: {"choices":[{"delta":{"content":"lo \\u00e9"}}]}\r\n\r\n'
        b"data: [DONE]\n\n"
    )
    for size in (1, 2, 7, len(stream)):
        d = SSEDecoder()
        pieces = [p for i in range(0, len(stream), size) for p in d.feed(stream[i : i + size])]
        assert "".join(pieces) == "Hello é" and d.done


def test_sse_decoder_reports_a_server_error_event() -> None:
    with pytest.raises(ChatError, match="out of memory"):
        SSEDecoder().feed(b'data: {"error": {"message": "out of memory"}}\n')


def test_chat_usage_errors_exit_2() -> None:
    assert ftctl("chat").returncode == 2
    assert ftctl("chat", "--job", "a", "--endpoint", "http://127.0.0.1:9").returncode == 2


def test_unreachable_endpoint_is_a_clear_error() -> None:
    proc = ftctl("chat", "--endpoint", "http://127.0.0.1:9", "--model", "m", "--prompt", "hi")
    assert proc.returncode == 1
    assert "cannot reach the model at http://127.0.0.1:9/v1" in proc.stderr
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------------------ refusals


def test_job_refusals_name_the_job_and_the_reason(emulator_server: EmulatorServer, kube_env: dict[str, str]) -> None:
    proc = ftctl("chat", "--job", "nope", "-n", "ml", "--prompt", "hi", env=kube_env)
    assert proc.returncode == 1 and 'FineTuneJob "nope" not found in namespace "ml"' in proc.stderr

    seed_serving_job(emulator_server, "training", "ml", backend=None, ready=False)
    proc = ftctl("chat", "--job", "training", "-n", "ml", "--prompt", "hi", env=kube_env)
    assert proc.returncode == 1
    assert 'FineTuneJob "training" in namespace "ml" is not Ready yet (state Running, stage serve)' in proc.stderr

    seed_serving_job(emulator_server, "no-endpoints", "ml", backend=None)
    proc = ftctl("chat", "--job", "no-endpoints", "-n", "ml", "--prompt", "hi", env=kube_env)
    assert proc.returncode == 1 and 'no endpoints available for service "no-endpoints-serve"' in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_kubeconfig_is_a_clear_error(tmp_path: Path) -> None:
    env = {**os.environ, "KUBECONFIG": str(tmp_path / "absent")}
    proc = ftctl("chat", "--job", "x", "--prompt", "hi", env=env)
    assert proc.returncode == 1 and "no kubeconfig at" in proc.stderr


# ------------------------------------------------------------------------------------------------ real vLLM


@pytest.mark.vllm
@pytest.mark.slow
def test_answer_streams_in_pieces(tiny_vllm: ServedModel) -> None:
    body: dict[str, Any] = chat_request(tiny_vllm.name, [{"role": "user", "content": "Count to ten."}], 24, 0.0)
    pieces = list(stream_chat(f"{tiny_vllm.base_url}/v1", body))
    assert len(pieces) > 1  # streamed, not one blob
    assert "".join(pieces).strip()


@pytest.mark.vllm
@pytest.mark.slow
def test_one_shot_prompt_against_an_endpoint(tiny_vllm: ServedModel) -> None:
    proc = ftctl("chat", "--endpoint", tiny_vllm.base_url, "--prompt", "Say hello.", "--max-tokens", "12")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
    proc = ftctl("chat", "--endpoint", tiny_vllm.base_url, "--model", "not-served", "--prompt", "hi")
    assert proc.returncode == 1 and "not-served" in proc.stderr and "HTTP 404" in proc.stderr


@pytest.mark.vllm
@pytest.mark.slow
def test_interactive_session_through_the_api_server(
    tiny_vllm: ServedModel, emulator_server: EmulatorServer, kube_env: dict[str, str]
) -> None:
    seed_serving_job(emulator_server, "bot", "ml", backend=tiny_vllm.base_url)
    session = "Hello!\n/reset\nWhat is two plus two?\n/exit\n"
    proc = ftctl(
        "chat", "--job", "bot", "-n", "ml", "--system", "Be brief.", "--max-tokens", "8", env=kube_env, stdin=session
    )
    assert proc.returncode == 0, proc.stderr
    assert "chatting with tiny-chat (ml/bot)" in proc.stderr
    assert "(conversation forgotten)" in proc.stderr
    assert len([line for line in proc.stdout.splitlines() if line.strip()]) >= 2  # two answers
    # It went through the API server's Service proxy, as the services/proxy subresource (RBAC sees it so).
    proxied = [r for r in emulator_server.emulator.request_log if r.subresource == "proxy"]
    assert [(r.verb, r.namespace, r.name) for r in proxied] == [("create", "ml", "bot-serve")] * 2

    # One-shot, the prompt from standard input (scripts).
    proc = ftctl(
        "chat", "--job", "bot", "-n", "ml", "--prompt", "-", "--max-tokens", "8", env=kube_env, stdin="Say yes."
    )
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr
