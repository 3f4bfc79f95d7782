"""Which spec fields may change after a FineTuneJob started, and what the operator acts on.

Once the first child exists, the pipeline is a function of the spec it was started with: changing the
model, data, stages or output half-way would leave a pipeline whose earlier stages trained something else
than the later ones consume. So the operator records the spec it *accepted* (annotation
``finetune.dev/accepted-spec``, compact JSON) and keeps driving that one. The CRD refuses such edits with CEL
(``self == oldSelf``); this check is the second line for clusters where the CRD is older or validation off.

Mutable: ``suspend`` (suspend/resume the running workload), ``retries`` (raise the budget of a failing
stage) and ``serve.replicas`` (scale the Deployment). Everything else is immutable.

Re-running: a new ``spec.runId`` (:func:`is_new_run`) asks for the pipeline to run again, from the first
step, into per-run folders and workloads. That edit is accepted whole (the new run may change any training
field, since nothing of the new run exists yet); the CRD's CEL rules make the same exception. Removing a
runId is not a new run: it stays a refused edit.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from typing import Any, Final

from finetune_operator.api.constants import GROUP

ANNOTATION_ACCEPTED_SPEC: Final = f"{GROUP}/accepted-spec"

#: Dotted paths of the fields that may change while the pipeline runs.
MUTABLE_PATHS: Final = ("suspend", "retries", "serve.replicas")


def _pop(d: dict[str, Any], path: str) -> None:
    head, _, rest = path.partition(".")
    if rest:
        sub = d.get(head)
        if isinstance(sub, dict):
            _pop(sub, rest)
    else:
        d.pop(head, None)


def _get(d: Mapping[str, Any], path: str) -> tuple[bool, Any]:
    head, _, rest = path.partition(".")
    if head not in d:
        return False, None
    if rest:
        sub = d[head]
        return _get(sub, rest) if isinstance(sub, Mapping) else (False, None)
    return True, d[head]


def _set(d: dict[str, Any], path: str, value: Any) -> None:
    head, _, rest = path.partition(".")
    if rest:
        sub = d.setdefault(head, {})
        if isinstance(sub, dict):
            _set(sub, rest, value)
    else:
        d[head] = value


def _without(d: Mapping[str, Any], path: str) -> dict[str, Any]:
    """A copy of ``d`` without ``path``; only the dicts on the path are copied (the rest is shared)."""
    head, _, rest = path.partition(".")
    out = dict(d)
    if rest:
        sub = out.get(head)
        if isinstance(sub, Mapping):
            out[head] = _without(sub, rest)
    else:
        out.pop(head, None)
    return out


def immutable_part(spec: Mapping[str, Any]) -> dict[str, Any]:
    """``spec`` without the mutable fields (shares unchanged sub-objects with ``spec``: read it, do not edit)."""
    out = dict(spec)
    for path in MUTABLE_PATHS:
        out = _without(out, path)
    # ``serve: {}`` and an absent serve are the same after removing replicas.
    if out.get("serve") == {}:
        out.pop("serve")
    return out


def changed_immutable_fields(accepted: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Top-level paths (``spec.model``, ``spec.serve``) whose immutable content differs, sorted."""
    a, b = immutable_part(accepted), immutable_part(current)
    return sorted(f"spec.{k}" for k in set(a) | set(b) if a.get(k) != b.get(k))


def effective_spec(accepted: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, Any]:
    """The accepted spec with the current values of the mutable fields: what the operator drives."""
    out = dict(accepted)
    for path in MUTABLE_PATHS:
        out = _without(out, path)  # copies the dicts on the path, so setting below never touches ``accepted``
        found, value = _get(current, path)
        if found:
            _set(out, path, copy.deepcopy(value))
    return out


def dump(spec: Mapping[str, Any]) -> str:
    """Compact, key-sorted JSON (stable, so the annotation does not churn)."""
    return json.dumps(spec, sort_keys=True, separators=(",", ":"))


def load(text: str | None) -> dict[str, Any] | None:
    """The accepted spec, or None when absent or unreadable (then the current spec is re-validated)."""
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def run_id(spec: Mapping[str, Any]) -> str | None:
    """``spec.runId``, or None."""
    value = spec.get("runId")
    return str(value) if value else None


def is_new_run(accepted: Mapping[str, Any], current: Mapping[str, Any]) -> bool:
    """The current spec asks for a new run: its runId is set and differs from the accepted one."""
    new = run_id(current)
    return new is not None and new != run_id(accepted)
