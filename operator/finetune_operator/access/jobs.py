"""A FineTuneJob as a person outside the operator sees it: is it serving, as which model, how did it train.

Everything here reads the object as the API returns it (camelCase dicts), tolerating what is missing: the
job may be brand new, from an older operator, or half-written. Where the served model is reached, the Service
name and port are *derived from the job's name* exactly as the renderer names them, never read from status, so
nothing written into status can redirect a chat to another address.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from finetune_operator.api import constants as c
from finetune_operator.api.history import parse_history
from finetune_operator.api.naming import service_name
from finetune_operator.api.types import LossPoint
from finetune_operator.render.serve import SERVE

from .cluster import AccessError


class NotServing(AccessError):
    """The job exists but no model answers for it (yet); the message says why and what to do."""


@dataclass(frozen=True)
class Serving:
    """Where a job's model is served and under which name."""

    namespace: str
    service: str
    port: int
    model: str

    @property
    def in_cluster_base(self) -> str:
        """The OpenAI base URL inside the cluster (the Service's DNS name)."""
        return f"http://{self.service}.{self.namespace}.svc:{self.port}/v1"


def condition(job: Mapping[str, Any], type_: str) -> Mapping[str, Any] | None:
    for cond in (job.get("status") or {}).get("conditions") or []:
        if isinstance(cond, Mapping) and cond.get("type") == type_:
            return cond
    return None


def _where(job: Mapping[str, Any]) -> str:
    meta = job.get("metadata") or {}
    return f'FineTuneJob "{meta.get("name")}" in namespace "{meta.get("namespace") or "default"}"'


def serving(job: Mapping[str, Any]) -> Serving:
    """The served model of a Ready job; :class:`NotServing` with the reason otherwise."""
    meta, spec, status = job.get("metadata") or {}, job.get("spec") or {}, job.get("status") or {}
    name, namespace = str(meta.get("name") or ""), str(meta.get("namespace") or "default")
    serve = spec.get("serve") or {}
    if not serve.get("enabled"):
        raise NotServing(f"{_where(job)} does not serve a model (spec.serve.enabled is not true)")
    ready = condition(job, c.ConditionType.READY)
    outputs = status.get("outputs") or {}
    if not ready or ready.get("status") != "True" or not outputs.get("endpoint"):
        state = status.get("state") or "Pending"
        stage = f", stage {status['currentStage']}" if status.get("currentStage") else ""
        why = f": {ready.get('reason')}: {ready.get('message')}" if ready and ready.get("message") else ""
        raise NotServing(f"{_where(job)} is not Ready yet (state {state}{stage}){why}")
    model = outputs.get("servedModelName") or serve.get("servedModelName") or name
    return Serving(namespace=namespace, service=service_name(name, SERVE), port=c.VLLM_PORT, model=str(model))


def histories(job: Mapping[str, Any]) -> dict[str, list[LossPoint]]:
    """Each training stage's loss history (``status.stages[].history``), in stage order; stages without one
    are left out."""
    out: dict[str, list[LossPoint]] = {}
    for stage in (job.get("status") or {}).get("stages") or []:
        if isinstance(stage, Mapping) and (points := parse_history(stage.get("history"))):
            out[str(stage.get("name"))] = points
    return out
