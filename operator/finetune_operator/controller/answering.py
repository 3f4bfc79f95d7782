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

What counts (:func:`judge`, in :mod:`finetune_operator.chatcheck`, shared with the answer Job below): HTTP 200,
a JSON ``chat.completion`` whose ``choices[0].message`` is an object and whose ``model`` (when given) is the
served name asked for. Anything else is a failure described by its HTTP status and the error's reason/type and
message fields only (never the raw body: the detail goes into status and events, which must not carry whatever
an unexpected server put in its answer).

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
reads no Secrets) and could not send through the proxy (the API server consumes the Authorization header). There
the check runs inside the cluster instead: the operator creates a small batch/v1 **answer Job**
(:mod:`finetune_operator.render.answer`) running ``ftctl worker answer`` in the worker image, which POSTs the
same request to the Service's cluster DNS URL (the ``status.outputs.endpoint`` one) with ``Authorization:
Bearer`` and the key, which reaches the pod only as a ``secretKeyRef`` env var. The worker judges the answer
with the same :func:`judge` and writes its verdict (ok, or failed with the sanitized detail: never the key, never
the raw body) to its termination message; the operator reads it from the Job's pod (controller ownerReference
= that Job's uid, as the eval/publish results: :mod:`.results`), never from status. The Job is one attempt
(``backoffLimit`` 0, no ServiceAccount token, Pod Security "restricted", ``ttlSecondsAfterFinished`` one hour,
owned by the FineTuneJob); a failed verdict (or a Job that failed without one) is a failed check with the same
backoff, and the next attempt is a new Job named after the rollout (Deployment uid, template hash and
generation: a resume is a new rollout whose check a finished Job of the previous one cannot answer) and the
attempt number (:func:`~finetune_operator.render.answer.answer_job_name`), so at most one runs per rollout at a
time. After an operator restart the attempts count again from 1, adopting the Jobs that still exist.
"""

from __future__ import annotations

from typing import Final
from urllib.parse import quote

from finetune_operator.api import constants as c
from finetune_operator.chatcheck import COMPLETIONS_PATH, MAX_TOKENS, PROMPT, Answer, judge, request_body

__all__ = [
    "ANNOTATION_ANSWERED",
    "COMPLETIONS_PATH",
    "MAX_TOKENS",
    "PROMPT",
    "WARN_AFTER",
    "Answer",
    "answered_value",
    "judge",
    "proxy_path",
    "request_body",
    "retry_delay",
]

#: On the vLLM Deployment: ``<uid>:<template hash>`` of the rollout a chat completion succeeded on.
ANNOTATION_ANSWERED: Final = c.ANNOTATION_ANSWERED
#: Consecutive failures after which one Warning event is posted.
WARN_AFTER: Final = 3


def proxy_path(namespace: str, service: str, port: int | str, path: str = COMPLETIONS_PATH) -> str:
    """The API server's Service proxy path to ``path`` on the Service's ``port``."""
    return (
        f"/api/v1/namespaces/{quote(namespace, safe='')}/services/"
        f"{quote(service, safe='')}:{quote(str(port), safe='')}/proxy{path}"
    )


def answered_value(uid: str, template_hash: str) -> str:
    """The annotation value recording that the rollout of ``template_hash`` on Deployment ``uid`` answered."""
    return f"{uid}:{template_hash}"


def retry_delay(failures: int, initial: float, maximum: float) -> float:
    """Seconds before the next check after ``failures`` consecutive failures (exponential, capped)."""
    return float(min(maximum, initial * 2 ** max(0, failures - 1)))
