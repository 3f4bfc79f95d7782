"""The base model (template, hub id) and every Secret reference of the spec."""

from __future__ import annotations

from collections.abc import Iterator

from finetune_operator.api import patterns
from finetune_operator.api.types import SecretKeyRef
from finetune_operator.errors import FieldError
from finetune_operator.validation.context import Context
from finetune_operator.validation.registry import rule
from finetune_operator.validation.words import hint


@rule
def model_template_known(ctx: Context) -> Iterator[FieldError]:
    model = ctx.spec.model
    template = model.template if model is not None else None
    if template and template not in ctx.lf.templates:
        yield FieldError(
            "spec.model.template", f"unknown LLaMA-Factory template {template!r}{hint(template, ctx.lf.templates)}"
        )


@rule
def model_source_is_hub_id(ctx: Context) -> Iterator[FieldError]:
    source = ctx.spec.model.source if ctx.spec.model is not None else None
    if source is not None and not patterns.HUB_ID_RE.match(source):
        yield FieldError(
            "spec.model.source",
            f"{source!r} is not a hub model id (like 'Qwen/Qwen2-7B-Instruct'); "
            "omit source when the model is already on the volume",
        )


def secret_refs(ctx: Context) -> Iterator[tuple[str, SecretKeyRef]]:
    """Every Secret reference of the spec with its wire path."""
    model = ctx.spec.model
    if model is not None and model.token_secret_ref is not None:
        yield "spec.model.tokenSecretRef", model.token_secret_ref
    serve = ctx.spec.serve
    for j, var in enumerate(serve.env):
        if var is not None and var.value_from is not None and var.value_from.secret_key_ref is not None:
            yield f"spec.serve.env[{j}].valueFrom.secretKeyRef", var.value_from.secret_key_ref
    if serve.api_key_secret_ref is not None:
        yield "spec.serve.apiKeySecretRef", serve.api_key_secret_ref


@rule
def secret_refs_valid(ctx: Context) -> Iterator[FieldError]:
    for path, ref in secret_refs(ctx):
        if ref.name and not patterns.DNS_SUBDOMAIN_RE.match(ref.name):
            yield FieldError(f"{path}.name", "must be a Secret name (DNS-1123 subdomain)")
        if ref.key and not patterns.SECRET_KEY_RE.match(ref.key):
            yield FieldError(f"{path}.key", "must be a Secret key (letters, digits, '-', '_', '.')")
