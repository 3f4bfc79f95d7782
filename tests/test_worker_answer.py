"""``ftctl worker answer``: the answer Job's check of a Service that needs an API key.

The real CLI in a subprocess against the stand-in of vLLM's OpenAI server (tests/emulator/chat_backend.py,
with vLLM's ``--api-key`` behaviour: 401 ``{"error": "Unauthorized"}`` without the right Bearer key). The key
comes only from the environment; the verdict goes to the termination message; the key is in no output.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from finetune_operator import chatcheck
from finetune_operator.controller import results

from .emulator.chat_backend import STANDIN, Behaviour

FTCTL = str(Path(sys.executable).parent / "ftctl")
KEY = "canary-api-key-7f3a9c"


@pytest.fixture()
def backend() -> tuple[str, Behaviour]:
    url = STANDIN.register(("tiny",))
    behaviour = STANDIN.behaviour(url)
    behaviour.api_key = KEY
    return url + chatcheck.COMPLETIONS_PATH, behaviour


def _answer(url: str, key: str | None, tmp_path: Path, model: str = "tiny") -> tuple[int, str, str]:
    log = tmp_path / "termination-log"
    log.write_text("")
    env = {"PATH": "/usr/bin:/bin", "FT_TERMINATION_LOG": str(log)}
    if key is not None:
        env["FT_API_KEY"] = key
    done = subprocess.run(
        [FTCTL, "worker", "answer", "--url", url, "--model", model, "--timeout", "10"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done.returncode, done.stdout + done.stderr, log.read_text()


def test_the_right_key_answers_ok_and_a_wrong_one_fails_with_the_401(
    backend: tuple[str, Behaviour], tmp_path: Path
) -> None:
    url, behaviour = backend
    code, output, message = _answer(url, KEY, tmp_path)
    assert code == 0, output
    assert json.loads(message) == {"answer": "ok"}
    assert behaviour.authorizations == [f"Bearer {KEY}"]
    (sent,) = behaviour.requests
    assert sent == chatcheck.request_body("tiny")

    wrong = "not-the-key-123"
    code, output, message = _answer(url, wrong, tmp_path)
    assert code == 1
    assert json.loads(message) == {"answer": "failed", "detail": "HTTP 401 Unauthorized"}
    assert "HTTP 401 Unauthorized" in output
    assert KEY not in output + message and wrong not in output + message


def test_no_key_a_wrong_model_or_no_server_fail_with_their_reason(
    backend: tuple[str, Behaviour], tmp_path: Path
) -> None:
    url, behaviour = backend
    code, _, message = _answer(url, None, tmp_path)
    assert code == 1 and "FT_API_KEY is not set" in json.loads(message)["detail"]
    assert behaviour.requests == []
    code, _, message = _answer(url, KEY, tmp_path, model="other")
    assert code == 1 and json.loads(message)["detail"].startswith("HTTP 404 NotFoundError")
    code, output, message = _answer("http://127.0.0.1:9/v1/chat/completions", KEY, tmp_path)
    assert code == 1 and json.loads(message)["detail"].startswith("no answer:")
    assert KEY not in output + message


def test_a_server_echoing_the_key_does_not_get_it_into_the_verdict(
    backend: tuple[str, Behaviour], tmp_path: Path
) -> None:
    url, behaviour = backend
    behaviour.models = ()  # the stand-in's 404 names the model asked for: ask with the key as the model name
    code, output, message = _answer(url, KEY, tmp_path, model=KEY)
    assert code == 1 and "***" in json.loads(message)["detail"]
    assert KEY not in message and KEY not in output


def test_the_operator_reads_only_an_ok_of_a_container_that_exited_zero() -> None:
    def pod(message: str, code: int, uid: str = "job-uid") -> dict[str, object]:
        return {
            "metadata": {"ownerReferences": [{"kind": "Job", "controller": True, "uid": uid}]},
            "status": {"containerStatuses": [{"state": {"terminated": {"exitCode": code, "message": message}}}]},
        }

    ok = chatcheck.verdict_message(chatcheck.Answer(True))
    failed = chatcheck.verdict_message(chatcheck.Answer(False, "HTTP 401 Unauthorized"))
    assert results.answer_verdict([pod(ok, 0)], "job-uid") == chatcheck.Answer(True)
    assert results.answer_verdict([pod(ok, 0, uid="another-job")], "job-uid") is None
    assert results.answer_verdict([pod(ok, 1)], "job-uid") == chatcheck.Answer(False, "the answer check exited 1")
    assert results.answer_verdict([pod(failed, 1)], "job-uid") == chatcheck.Answer(False, "HTTP 401 Unauthorized")
    assert results.answer_verdict([pod("not json", 0), pod('{"metrics": {}}', 0)], "job-uid") is None
