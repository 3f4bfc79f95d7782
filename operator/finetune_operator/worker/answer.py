"""``ftctl worker answer``: one chat completion to a Service that needs an API key, judged, with a verdict.

Runs in the answer Job (:mod:`finetune_operator.render.answer`) the operator creates after a rollout of a
FineTuneJob with ``serve.apiKeySecretRef``: the operator cannot send the key itself (it reads no Secrets, and the
API server's Service proxy drops the Authorization header). The request and the rules are those of the proxy
check (:mod:`finetune_operator.chatcheck`), so ``Ready`` means the same with and without a key.

The key comes only from the environment (``FT_API_KEY``, a ``secretKeyRef`` in the pod) and goes only into the
``Authorization`` header: the verdict carries the HTTP status and the error's own words, with the key masked
should a server echo it, never the raw body. Pure standard library (urllib): nothing to install in the image.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Mapping

from finetune_operator.chatcheck import Answer, judge, one_line, request_body

#: The env var the key is read from (see :data:`finetune_operator.render.answer.KEY_ENV`).
KEY_ENV = "FT_API_KEY"
#: Largest answer read (a completion of a few tokens is far smaller).
_MAX_BODY = 1 << 20


def _mask(text: str, key: str) -> str:
    return text.replace(key, "***") if key else text


def check(url: str, model: str, key: str, timeout: float = 60.0) -> Answer:
    """POST one chat completion of ``model`` to ``url`` with ``Authorization: Bearer <key>``; the verdict."""
    data = json.dumps(request_body(model)).encode()
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, body = int(resp.status), resp.read(_MAX_BODY)
    except urllib.error.HTTPError as exc:
        status, body = int(exc.code), exc.read(_MAX_BODY)
    except (urllib.error.URLError, TimeoutError, ConnectionError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        return Answer(False, _mask(one_line(f"no answer: {reason}"), key))
    answer = judge(status, body, model)
    return answer if answer.ok else Answer(False, _mask(answer.detail, key))


def run_answer(url: str, model: str, env: Mapping[str, str] | None = None, timeout: float = 60.0) -> Answer:
    """:func:`check` with the key from ``env`` (the process environment by default)."""
    key = (env if env is not None else os.environ).get(KEY_ENV, "")
    if not key:
        return Answer(False, f"no API key: {KEY_ENV} is not set")
    return check(url, model, key, timeout)
