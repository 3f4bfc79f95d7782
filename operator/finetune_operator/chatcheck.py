"""What one chat completion must look like to count as an answer, and how its verdict travels. Pure functions.

Shared by the operator's answer check through the API server's Service proxy
(:mod:`finetune_operator.controller.answering`) and by ``ftctl worker answer``, the in-cluster check of a
Service that needs an API key (:mod:`finetune_operator.worker.answer`): both send the same request and judge the
answer by the same rules, so ``Ready`` means the same with and without ``serve.apiKeySecretRef``. It lives at the
top of the package because the worker may not import the controller (import-linter contracts in pyproject).

What counts (:func:`judge`): HTTP 200, a JSON ``chat.completion`` whose ``choices[0].message`` is an object and
whose ``model`` (when given) is the served name asked for. Anything else is a failure described by its HTTP
status and the error's reason/type and message fields only (never the raw body: the detail goes into status
and events, which must not carry whatever an unexpected server put in its answer).

The worker's verdict (:func:`verdict_message`, :func:`parse_verdict`) is one JSON line in its termination
message: ``{"answer": "ok"}`` or ``{"answer": "failed", "detail": "..."}``. The operator trusts an ``ok`` only
from a container that exited 0.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final

#: The completion path of vLLM's OpenAI-compatible server.
COMPLETIONS_PATH: Final = "/v1/chat/completions"
#: A prompt any chat model answers; the answer's content is not judged, only that one is produced.
PROMPT: Final = "Reply with the single word: ready"
#: Few tokens: the check proves the model generates, it does not measure it.
MAX_TOKENS: Final = 4
#: Longest error detail kept (status and events are small).
DETAIL_MAX: Final = 200
#: Longest verdict message read back (a termination message is at most 4096 bytes).
_VERDICT_MAX: Final = 4096


@dataclass(frozen=True)
class Answer:
    """The outcome of one check: ``ok``, else ``detail`` says why (HTTP status and the error's own words)."""

    ok: bool
    detail: str = ""


def request_body(model: str) -> dict[str, Any]:
    """The chat completion sent: deterministic (temperature 0), a few tokens, not streamed."""
    return {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": False,
    }


def one_line(text: Any) -> str:
    """``text`` on one line, at most :data:`DETAIL_MAX` characters."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= DETAIL_MAX else flat[: DETAIL_MAX - 3] + "..."


def _error_words(body: bytes) -> str:
    """The reason/type and message of a JSON error answer (an API server Status or an OpenAI-style error)."""
    try:
        doc = json.loads(body)
    except ValueError:
        return ""
    if not isinstance(doc, dict):
        return ""
    inner = doc.get("error")
    if isinstance(inner, str):  # vLLM's API-key middleware: {"error": "Unauthorized"}
        return one_line(inner)
    err: dict[str, Any] = inner if isinstance(inner, dict) else doc
    kind = err.get("reason") or err.get("type") or ""
    message = err.get("message") or ""
    if not isinstance(kind, str) or not isinstance(message, str):
        return ""
    return one_line(f"{kind}: {message}" if kind and message else kind or message)


def judge(status: int, body: bytes, model: str) -> Answer:
    """Whether an answer of the completions endpoint is a well-formed completion by ``model``."""
    if status != 200:
        words = _error_words(body)
        return Answer(False, f"HTTP {status}" + (f" {words}" if words else ""))
    try:
        doc = json.loads(body)
    except ValueError:
        return Answer(False, "HTTP 200 but the answer is not JSON")
    choices = doc.get("choices") if isinstance(doc, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return Answer(False, "HTTP 200 but the answer has no choices")
    if not isinstance(choices[0].get("message"), dict):
        return Answer(False, "HTTP 200 but choices[0] has no message")
    answered_by = doc.get("model")
    if answered_by is not None and answered_by != model:
        return Answer(False, f"HTTP 200 but the answer is from model {one_line(answered_by)!r}, not {model!r}")
    return Answer(True)


def verdict_message(answer: Answer) -> str:
    """The worker's termination message for ``answer`` (one JSON line)."""
    if answer.ok:
        return json.dumps({"answer": "ok"})
    return json.dumps({"answer": "failed", "detail": one_line(answer.detail)})


def parse_verdict(message: str | None, exit_code: int) -> Answer | None:
    """A worker's verdict (None when ``message`` is not one); ``ok`` only with exit code 0."""
    if message is None or len(message.encode("utf-8", "replace")) > _VERDICT_MAX:
        return None
    try:
        doc = json.loads(message)
    except ValueError:
        return None
    if not isinstance(doc, dict) or doc.get("answer") not in ("ok", "failed"):
        return None
    if doc["answer"] == "ok":
        return Answer(True) if exit_code == 0 else Answer(False, f"the answer check exited {exit_code}")
    detail = doc.get("detail")
    return Answer(False, one_line(detail) if isinstance(detail, str) and detail else "no detail")
