"""The answer check: one real chat completion through the vLLM Service before ``Ready`` turns true.

Why: a Deployment is "available" when its pods pass their readiness probe, and vLLM's ``/health`` answers
before (and regardless of whether) the model generates: a wrong served name, a broken chat template or a
model that cannot run would still report Ready. So after every rollout (the first one, a re-run's roll, a
re-created Deployment, a resume from ``spec.suspend``) the operator sends one short chat completion, the way a
client would, and only a well-formed answer counts.

How it reaches the Service: through the API server's Service proxy
(``POST /api/v1/namespaces/NS/services/NAME:PORT/proxy/v1/chat/completions``), with the operator's own API
client. That works wherever the operator runs (in the cluster or outside it with a kubeconfig), needs no
NetworkPolicy hole towards the serving pods, and is authorised as ``create`` on ``services/proxy`` (the one
extra permission, see :mod:`.rbac`). The API server authenticates the request and does not forward the
operator's credentials to vLLM.

What counts (:func:`judge`): HTTP 200, a JSON ``chat.completion`` whose ``choices[0].message`` is an object and
whose ``model`` (when given) is the served name asked for. Anything else is a failure described by its HTTP
status and the error's reason/type and message fields only (never the raw body: the detail goes into status
and events, which must not carry whatever an unexpected server put in its answer).

Where the result lives: on the Deployment, annotation :data:`ANNOTATION_ANSWERED` = ``<uid>:<template
hash>`` (see :func:`answered_value`). Only the operator writes Deployments (worker pods may patch the
FineTuneJob's status, so a record there could be forged). A new template (a re-run's model), a re-created
Deployment (new uid) or a scale to zero (the annotation is removed then) each require a new answer; a change of
``replicas`` alone does not.

Retries and the permanent failure: a failed check is retried with exponential backoff (2 s doubling up to
``answer_retry_max``, 60 s by default) for as long as it fails; ``Ready`` stays False with reason
``ServiceNotAnswering`` and the last failure, the serve stage keeps running (``Progressing``), and one Warning
event says so after :data:`WARN_AFTER` consecutive failures. The operator never rolls back or deletes on its
own: once a re-run's rollout has completed the previous model's pods are gone, and the fix is the user's (a
corrected spec under a new ``runId``, or whatever broke the server). A check that passes later turns ``Ready``
true with a Normal event.

With ``serve.apiKeySecretRef`` vLLM answers only requests carrying the key, which the operator does not hold (it
reads no Secrets) and could not send through the proxy (the API server consumes the Authorization header):
there the check is skipped and ``Ready`` follows the Deployment's availability, as the condition's message says.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import quote

from finetune_operator.api import constants as c

#: On the vLLM Deployment: ``<uid>:<template hash>`` of the rollout a chat completion succeeded on.
ANNOTATION_ANSWERED: Final = c.ANNOTATION_ANSWERED
#: The completion path of vLLM's OpenAI-compatible server.
COMPLETIONS_PATH: Final = "/v1/chat/completions"
#: A prompt any chat model answers; the answer's content is not judged, only that one is produced.
PROMPT: Final = "Reply with the single word: ready"
#: Few tokens: the check proves the model generates, it does not measure it.
MAX_TOKENS: Final = 4
#: Consecutive failures after which one Warning event is posted.
WARN_AFTER: Final = 3
#: Longest error detail kept (status and events are small).
_DETAIL_MAX: Final = 200


@dataclass(frozen=True)
class Answer:
    """The outcome of one check: ``ok``, else ``detail`` says why (HTTP status and the error's own words)."""

    ok: bool
    detail: str = ""


def proxy_path(namespace: str, service: str, port: int | str, path: str = COMPLETIONS_PATH) -> str:
    """The API server's Service proxy path to ``path`` on the Service's ``port``."""
    return (
        f"/api/v1/namespaces/{quote(namespace, safe='')}/services/"
        f"{quote(service, safe='')}:{quote(str(port), safe='')}/proxy{path}"
    )


def request_body(model: str) -> dict[str, Any]:
    """The chat completion sent: deterministic (temperature 0), a few tokens, not streamed."""
    return {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": False,
    }


def _one_line(text: Any) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= _DETAIL_MAX else flat[: _DETAIL_MAX - 3] + "..."


def _error_words(body: bytes) -> str:
    """The reason/type and message of a JSON error answer (an API server Status or an OpenAI-style error)."""
    try:
        doc = json.loads(body)
    except ValueError:
        return ""
    if not isinstance(doc, dict):
        return ""
    inner = doc.get("error")
    err: dict[str, Any] = inner if isinstance(inner, dict) else doc
    kind = err.get("reason") or err.get("type") or ""
    message = err.get("message") or ""
    if not isinstance(kind, str) or not isinstance(message, str):
        return ""
    return _one_line(f"{kind}: {message}" if kind and message else kind or message)


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
        return Answer(False, f"HTTP 200 but the answer is from model {_one_line(answered_by)!r}, not {model!r}")
    return Answer(True)


def answered_value(uid: str, template_hash: str) -> str:
    """The annotation value recording that the rollout of ``template_hash`` on Deployment ``uid`` answered."""
    return f"{uid}:{template_hash}"


def retry_delay(failures: int, initial: float, maximum: float) -> float:
    """Seconds before the next check after ``failures`` consecutive failures (exponential, capped)."""
    return float(min(maximum, initial * 2 ** max(0, failures - 1)))
