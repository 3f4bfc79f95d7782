"""Validate a FineTuneJob and report *every* problem at once, each with its field path and reason.

Where each decision lives:

=======================  ==========================================================================
module                   job
=======================  ==========================================================================
:mod:`.loading`          YAML text -> documents, read as ``kubectl apply`` reads them
:mod:`.shape`            pass 1: the pydantic types in strict mode; errors -> wire paths and sentences
:mod:`.lenient`          the typed view the rules read, built even from an invalid object
:mod:`.context`          what a rule sees (the lenient job, LLaMA-Factory's argument table, the policy)
:mod:`.policy`           the install's policy (allowed images, trust_remote_code)
:mod:`.files`            which documents of a file are FineTuneJobs; the same job twice in one file
:mod:`.registry`         the rule registry (``RULES``)
:mod:`.rules`            pass 2: the semantic rules, one module per topic (see its table)
:mod:`.words`            how errors read (paths, kinds, "did you mean")
=======================  ==========================================================================

Both passes always run: a typo in one field must not hide an undeclared dataset in another. The rules read
a leniently parsed model, so defaults come from :mod:`finetune_operator.api.types` once; each rule skips what
is malformed (pass 1 already reported it) and checks what it can. Shared regular expressions live in
:mod:`finetune_operator.api.patterns`; the adapter chain is :func:`finetune_operator.render.chain.walk`, the
renderer's own.

To add a rule: write a function ``(ctx: Context) -> Iterator[FieldError]`` decorated with
:func:`~finetune_operator.validation.registry.rule` in the module of its topic under :mod:`.rules`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pydantic

from finetune_operator.api.patterns import is_quantity
from finetune_operator.api.types import FineTuneJob, FineTuneJobStatus
from finetune_operator.errors import FieldError, SpecError
from finetune_operator.lfargs import load as load_lf_table
from finetune_operator.render import RESERVED_STAGE_NAMES
from finetune_operator.validation import rules as _rules  # noqa: F401  (registers the rules)
from finetune_operator.validation.context import Context
from finetune_operator.validation.loading import load_documents
from finetune_operator.validation.policy import OFFLINE, Policy
from finetune_operator.validation.registry import RULES, Rule, rule
from finetune_operator.validation.rules.arguments import RESERVED_ARGS, RESERVED_PREFIXES, SECRET_ARGS
from finetune_operator.validation.shape import non_string_keys, shape_errors
from finetune_operator.validation.words import dedupe, kind

__all__ = [
    "OFFLINE",
    "RESERVED_ARGS",
    "RESERVED_PREFIXES",
    "RESERVED_STAGE_NAMES",
    "RULES",
    "SECRET_ARGS",
    "Context",
    "Policy",
    "Rule",
    "check",
    "is_quantity",
    "load_documents",
    "rule",
    "validate",
]


def validate(obj: Mapping[str, Any], policy: Policy = OFFLINE) -> FineTuneJob:
    """Parse and check ``obj`` (a FineTuneJob as a dict); raise :class:`SpecError` listing every problem."""
    job, errors = check(obj, policy)
    if errors or job is None:
        raise SpecError(errors or [FieldError("", "invalid FineTuneJob")])
    return job


def check(obj: Any, policy: Policy = OFFLINE) -> tuple[FineTuneJob | None, list[FieldError]]:
    """Like :func:`validate` but returns ``(job or None, errors)`` instead of raising (for the operator)."""
    if not isinstance(obj, Mapping):
        return None, [FieldError("<document>", f"expected a mapping (a FineTuneJob object), got {kind(obj)}")]
    obj = _plain(obj)
    # Status is the operator's and the workers' output, not user input: a status the types do not describe
    # (an older operator, a pruned field) must never make the *spec* invalid. It is parsed leniently below.
    status = obj.pop("status", None)
    errors: list[FieldError] = []
    job: FineTuneJob | None = None
    key_errors = non_string_keys(obj)
    errors.extend(key_errors)
    try:
        job = FineTuneJob.model_validate(obj, strict=True)
    except pydantic.ValidationError as exc:
        # A mapping with a non-string key is reported at the key; pydantic's "wrong type" at the mapping is noise.
        parents = {e.path.rsplit("[", 1)[0] for e in key_errors}
        errors.extend(e for e in shape_errors(exc, obj) if e.path not in parents)
    ctx = Context(obj, load_lf_table(), policy)
    for each in RULES:
        errors.extend(each(ctx))
    errors = dedupe(errors)
    if errors or job is None:
        return None, errors
    if isinstance(status, Mapping):
        try:
            job.status = FineTuneJobStatus.model_validate(status)
        except pydantic.ValidationError:
            job.status = None
    return job, errors


def _plain(value: Any) -> Any:
    """Deep copy into plain dicts and lists: kopf hands over mapping *views*, which strict pydantic refuses."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value
