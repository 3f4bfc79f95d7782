"""Names that the API, the renderer, the operator and the worker must agree on.

They are constants rather than literals scattered through the code because a typo in a label key or a
condition reason is a silent bug: the operator would simply never see its own children.
"""

from __future__ import annotations

from typing import Final

GROUP: Final = "finetune.dev"
VERSION: Final = "v1alpha1"
API_VERSION: Final = f"{GROUP}/{VERSION}"
KIND: Final = "FineTuneJob"
PLURAL: Final = "finetunejobs"
SINGULAR: Final = "finetunejob"
SHORT_NAME: Final = "ftj"
CATEGORY: Final = "finetune"

#: The value of ``app.kubernetes.io/managed-by`` on everything we create.
MANAGER: Final = "finetune-operator"
#: ``app.kubernetes.io/name`` on every child.
APP_NAME: Final = "finetune-operator"

# Labels on every child object (and every pod template).
LABEL_NAME: Final = "app.kubernetes.io/name"
LABEL_INSTANCE: Final = "app.kubernetes.io/instance"
LABEL_COMPONENT: Final = "app.kubernetes.io/component"
LABEL_MANAGED_BY: Final = "app.kubernetes.io/managed-by"
LABEL_PART_OF: Final = "app.kubernetes.io/part-of"
LABEL_JOB: Final = f"{GROUP}/job"
LABEL_STAGE: Final = f"{GROUP}/stage"
LABEL_KUEUE_QUEUE: Final = "kueue.x-k8s.io/queue-name"

# Annotations.
ANNOTATION_SPEC_HASH: Final = f"{GROUP}/spec-hash"
ANNOTATION_ATTEMPT: Final = f"{GROUP}/attempt"
#: On the vLLM Deployment: the ``spec.runId`` whose model it serves (the operator rolls it when a new run is done).
ANNOTATION_RUN: Final = f"{GROUP}/run"
#: On the vLLM Deployment: the evaluation metrics (JSON) of the model it serves, the promotion gate's
#: ``noWorseThanServing`` baseline. Only the operator may write Deployments; worker pods may write status.
ANNOTATION_METRICS: Final = f"{GROUP}/metrics"
#: On the vLLM Deployment: ``<uid>:<template hash>`` of the rollout that answered a real chat completion through
#: its Service (``Ready`` waits for it; see finetune_operator/controller/answering.py).
ANNOTATION_ANSWERED: Final = f"{GROUP}/answered"

# Default images (overridable per job with ``spec.image``/``spec.serve.image`` and per install with Helm values).
DEFAULT_WORKER_IMAGE: Final = "ghcr.io/finetune-dev/finetune-worker:0.1.0"
DEFAULT_VLLM_IMAGE: Final = "vllm/vllm-openai:v0.11.0"
#: The opt-in shared worker ServiceAccount (chart ``worker.create: true``); by default each FineTuneJob gets its own.
DEFAULT_WORKER_SERVICE_ACCOUNT: Final = "finetune-worker"

VLLM_PORT: Final = 8000


class ConditionType:
    """Condition types in ``status.conditions`` (Kubernetes API conventions: positive polarity)."""

    READY: Final = "Ready"
    """The model is served: the vLLM Deployment is available and its Service answered a chat completion (or,
    without serve, the pipeline succeeded)."""
    SUCCEEDED: Final = "Succeeded"
    """Every stage up to (not including) serving finished successfully."""
    FAILED: Final = "Failed"
    """The job cannot make progress without a change: invalid spec or a stage out of retries."""
    SUSPENDED: Final = "Suspended"
    """``spec.suspend`` is true and the running workload is suspended."""
    PROGRESSING: Final = "Progressing"
    """A stage is running (or waiting to be admitted)."""
    SPEC_ACCEPTED: Final = "SpecAccepted"
    """The current spec is the one being driven (False after a refused edit or an invalid change)."""

    ALL: Final = (READY, SUCCEEDED, FAILED, SUSPENDED, PROGRESSING)
    """The five pipeline conditions, in display order (SpecAccepted is listed after them)."""


class Reason:
    """``reason`` values of conditions and events: CamelCase, stable, documented."""

    INVALID_SPEC: Final = "InvalidSpec"
    ACCEPTED: Final = "Accepted"
    CHILD_CONFLICT: Final = "ChildConflict"
    CREATE_FAILED: Final = "CreateFailed"
    IMMUTABLE_FIELD: Final = "ImmutableField"
    STAGE_STARTED: Final = "StageStarted"
    STAGE_RUNNING: Final = "StageRunning"
    STAGE_SUCCEEDED: Final = "StageSucceeded"
    STAGE_FAILED: Final = "StageFailed"
    STAGE_RETRYING: Final = "StageRetrying"
    RETRIES_EXHAUSTED: Final = "RetriesExhausted"
    CHILD_MISSING: Final = "ChildMissing"
    CHILD_RECREATED: Final = "ChildRecreated"
    SUSPENDED: Final = "Suspended"
    RESUMED: Final = "Resumed"
    PIPELINE_SUCCEEDED: Final = "PipelineSucceeded"
    SERVING: Final = "Serving"
    SERVE_PENDING: Final = "ServePending"
    SCALED: Final = "Scaled"
    PENDING: Final = "Pending"
    RUN_STARTED: Final = "RunStarted"
    ROLLING_OUT: Final = "RollingOut"
    FORBIDDEN: Final = "Forbidden"
    #: Pre-flight: a stage's estimated per-GPU peak exceeds its GPU's memory.
    WILL_NOT_FIT: Final = "WillNotFit"
    #: Pre-flight: a dataset is unreadable or a stage has no valid sample.
    INVALID_DATA: Final = "InvalidData"
    #: Pre-flight passed (or only warned): the plan is in status.plan.
    PLANNED: Final = "Planned"
    #: The promotion gate (spec.gate) refused the run's model: not published, not served.
    GATE_FAILED: Final = "GateFailed"
    #: The vLLM Deployment is available but its Service has not answered a chat completion (yet).
    SERVICE_NOT_ANSWERING: Final = "ServiceNotAnswering"
    #: The Service answered a chat completion after a rollout (event).
    SERVICE_ANSWERED: Final = "ServiceAnswered"
    #: A pod of the pipeline names a Secret (or a key of one) that does not exist: the kubelet cannot start it.
    SECRET_NOT_FOUND: Final = "SecretNotFound"


class State:
    """``status.state``: one word for ``kubectl get ftj``."""

    PENDING: Final = "Pending"
    RUNNING: Final = "Running"
    SUSPENDED: Final = "Suspended"
    SERVING: Final = "Serving"
    SUCCEEDED: Final = "Succeeded"
    FAILED: Final = "Failed"


class StageState:
    """``status.stages[].state``."""

    PENDING: Final = "Pending"
    RUNNING: Final = "Running"
    SUSPENDED: Final = "Suspended"
    SUCCEEDED: Final = "Succeeded"
    FAILED: Final = "Failed"
    RETRYING: Final = "Retrying"
