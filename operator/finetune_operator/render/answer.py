"""The answer Job: the in-cluster chat completion check of a Service that needs an API key (pure).

Why a Job: with ``serve.apiKeySecretRef`` vLLM answers only requests carrying the key. The operator reads no
Secrets and the API server's Service proxy drops the Authorization header, so the check runs where the key may
go: a pod of the worker image running ``ftctl worker answer``, the key in its environment only as a
``secretKeyRef``. The rules of the check and the verdict format are in :mod:`finetune_operator.chatcheck`; when
the operator creates the Job and how it reads the verdict, in :mod:`finetune_operator.controller.answering`.

The pod is small and closed: one attempt (``backoffLimit`` 0: the operator retries with a new Job), a deadline,
no ServiceAccount token (it calls no Kubernetes API), Pod Security "restricted", no volumes but ``/tmp``,
``ttlSecondsAfterFinished`` one hour (a failing check makes one Job per attempt), owned by the FineTuneJob (the
operator adds the ownerReference as for every child). Not part of ``ftctl render``: it exists only after a
rollout, which only the operator sees.
"""

from __future__ import annotations

from typing import Any, Final

from finetune_operator.api.naming import POD_SUFFIX_RESERVE, child_name, short_hash
from finetune_operator.api.types import FineTuneJob
from finetune_operator.chatcheck import COMPLETIONS_PATH
from finetune_operator.render.meta import metadata, run_scope
from finetune_operator.render.pods import PodOptions, Resources, pod_template
from finetune_operator.render.serve import endpoint, served_model_name

COMPONENT_ANSWER: Final = "answer"
#: The stage label of answer Jobs: they check the serve step.
STAGE: Final = "serve"
#: The env var ``ftctl worker answer`` reads the API key from (set from the Secret by ``secretKeyRef`` only).
KEY_ENV: Final = "FT_API_KEY"
#: One attempt of the check: a pod that cannot reach the Service gives up well before this.
ACTIVE_DEADLINE_SECONDS: Final = 300
#: Finished answer Jobs go after an hour (the operator has read the verdict within seconds).
TTL_SECONDS_AFTER_FINISHED: Final = 3600
#: Seconds the worker waits for the completion.
TIMEOUT_SECONDS: Final = 60


def answer_job_name(job: FineTuneJob, rollout: str, attempt: int) -> str:
    """``<job>[-<runId>]-answer-<hash of the rollout>-<attempt>``: one name per rollout and attempt."""
    return child_name(run_scope(job), "answer", short_hash(rollout), str(attempt), reserve=POD_SUFFIX_RESERVE)


def answer_url(job: FineTuneJob) -> str:
    """The Service's cluster DNS completions URL (the endpoint ``status.outputs`` shows, plus the path)."""
    return endpoint(job).removesuffix("/v1") + COMPLETIONS_PATH


def answer_job(job: FineTuneJob, image: str, rollout: str, attempt: int) -> dict[str, Any]:
    """The batch/v1 Job running ``ftctl worker answer`` against the Service of ``job`` (without ownerReference)."""
    ref = job.spec.serve.api_key_secret_ref
    if ref is None:
        raise ValueError("an answer Job is only for serve.apiKeySecretRef")
    env: list[dict[str, Any]] = [
        {"name": KEY_ENV, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}},
        {"name": "HOME", "value": "/tmp"},
    ]
    command = [
        "ftctl",
        "worker",
        "answer",
        "--url",
        answer_url(job),
        "--model",
        served_model_name(job),
        "--timeout",
        str(TIMEOUT_SECONDS),
    ]
    tpl = pod_template(
        job,
        PodOptions(
            component=COMPONENT_ANSWER,
            stage=STAGE,
            image=image,
            command=command,
            env=env,
            resources=Resources(cpu="100m", memory="128Mi"),
            mount_config=False,
            termination_grace_seconds=5,
        ),
    )
    tpl["spec"]["activeDeadlineSeconds"] = ACTIVE_DEADLINE_SECONDS
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata(job, answer_job_name(job, rollout, attempt), COMPONENT_ANSWER, STAGE),
        "spec": {
            "backoffLimit": 0,
            "activeDeadlineSeconds": ACTIVE_DEADLINE_SECONDS,
            "ttlSecondsAfterFinished": TTL_SECONDS_AFTER_FINISHED,
            "template": tpl,
        },
    }
