"""What each page shows, computed from the job objects as the API returns them (pure, tested directly).

Every value that reaches a template is plain data (strings, numbers, lists, dicts); escaping is the template
engine's job (autoescape on), and data embedded for the script goes through ``tojson``, which is safe inside
HTML.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from finetune_operator.access.jobs import NotServing, condition, histories, serving
from finetune_operator.api import constants as c


def _s(obj: Mapping[str, Any], *keys: str) -> Any:
    cur: Any = obj
    for k in keys:
        cur = cur.get(k) if isinstance(cur, Mapping) else None
    return cur


def row(job: Mapping[str, Any]) -> dict[str, Any]:
    """One line of the job list."""
    status = job.get("status") or {}
    ready = condition(job, c.ConditionType.READY)
    messages = [
        f"{cond.get('type')}: {cond.get('message')}"
        for cond in status.get("conditions") or []
        if isinstance(cond, Mapping) and cond.get("message") and cond.get("status") == "True"
    ]
    return {
        "name": _s(job, "metadata", "name"),
        "namespace": _s(job, "metadata", "namespace") or "default",
        "state": status.get("state") or "Pending",
        "stage": status.get("currentStage") or "",
        "progress": status.get("progress") or "",
        "loss": status.get("loss") or "",
        "ready": bool(ready and ready.get("status") == "True"),
        "messages": messages,
    }


def _metrics(status: Mapping[str, Any]) -> dict[str, Any]:
    """Evaluation results wherever a pipeline step recorded them (``status.outputs.metrics``, stage metrics)."""
    out: dict[str, Any] = {}
    outputs = status.get("outputs") or {}
    if isinstance(outputs.get("metrics"), Mapping):
        out.update(outputs["metrics"])
    for stage in status.get("stages") or []:
        if isinstance(stage, Mapping) and isinstance(stage.get("metrics"), Mapping):
            for k, v in stage["metrics"].items():
                out[f"{stage.get('name')}.{k}"] = v
    return out


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, int | float) or isinstance(seconds, bool) or seconds < 0:
        return ""
    minutes, _ = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min"


def _plan(raw: Any) -> dict[str, Any] | None:
    """The preflight plan (``status.plan``): per-stage rows, the reason and message when the job was refused."""
    if not isinstance(raw, Mapping):
        return None
    keys = (
        "name",
        "gpuMemoryGiB",
        "gpu",
        "gpuCapacityGiB",
        "verdict",
        "samples",
        "dropped",
        "truncated",
        "totalSteps",
        "suggestion",
    )
    stages = [
        {
            **{k: s.get(k) if s.get(k) is not None else "" for k in keys},
            "estimated": _duration(s.get("estimatedSeconds")),
        }
        for s in raw.get("stages") or []
        if isinstance(s, Mapping)
    ]
    return {"stages": stages, "reason": str(raw.get("reason") or ""), "message": str(raw.get("message") or "")}


def detail(job: Mapping[str, Any]) -> dict[str, Any]:
    """Everything the job page shows."""
    status = job.get("status") or {}
    stages = [
        {
            "name": s.get("name"),
            "type": s.get("type"),
            "state": s.get("state") or "Pending",
            "attempts": s.get("attempts") or 0,
            "start": s.get("startTime") or "",
            "end": s.get("completionTime") or "",
            "message": s.get("message") or "",
            "progress": s.get("progress") or {},
        }
        for s in status.get("stages") or []
        if isinstance(s, Mapping)
    ]
    curves = {
        name: [p.model_dump(by_alias=True, exclude_none=True) for p in points]
        for name, points in histories(job).items()
    }
    try:
        served = serving(job)
        chat = {"available": True, "model": served.model, "reason": ""}
    except NotServing as exc:
        chat = {"available": False, "model": "", "reason": str(exc)}
    conditions = [
        {k: cond.get(k) or "" for k in ("type", "status", "reason", "message", "lastTransitionTime")}
        for cond in status.get("conditions") or []
        if isinstance(cond, Mapping)
    ]
    plan = _plan(status.get("plan"))
    gate = status.get("gate") if isinstance(status.get("gate"), Mapping) else None
    return {
        **row(job),
        "stages": stages,
        "curves": curves,
        "conditions": conditions,
        "endpoint": _s(status, "outputs", "endpoint") or "",
        "chat": chat,
        "plan": plan,
        "gate": {"result": str(gate.get("result") or ""), "message": str(gate.get("message") or "")} if gate else None,
        "metrics": _metrics(status),
    }
