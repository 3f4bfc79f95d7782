"""Experiment trackers: credentials only through ``spec.tracking``'s Secret references.

Decisions:

- ``args.report_to`` naming ``wandb`` or ``mlflow`` is refused: those need credentials, and ``args`` land in a
  ConfigMap; ``spec.tracking`` passes them as ``secretKeyRef`` into training pods. ``tensorboard`` (no
  credentials) stays accepted in ``args`` for compatibility.
- With ``spec.tracking`` set, ``report_to`` belongs to it, and ``logging_dir`` may not move the TensorBoard
  logs away from the outputs, so ``args`` may not set them.
- Every Secret reference is a valid Secret name and key.
"""

from __future__ import annotations

from collections.abc import Iterator

from finetune_operator.api import patterns
from finetune_operator.api.types import SecretKeyRef
from finetune_operator.errors import FieldError
from finetune_operator.validation.context import Context
from finetune_operator.validation.registry import rule

_NEEDS_CREDENTIALS = ("wandb", "mlflow", "comet_ml", "neptune", "clearml", "swanlab")


def _targets(value: object) -> list[str]:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",")]
    if isinstance(value, list):
        return [str(v) for v in value]
    return []


@rule
def report_to_through_tracking(ctx: Context) -> Iterator[FieldError]:
    tracking = ctx.spec.tracking
    for i, stage in ctx.stages():
        args = stage.args or {}
        path = f"spec.stages[{i}].args"
        if tracking is not None:
            for key in ("report_to", "logging_dir"):
                if key in args:
                    yield FieldError(f"{path}.{key}", "set by spec.tracking: remove it from args")
            continue
        needs = [t for t in _targets(args.get("report_to")) if t in _NEEDS_CREDENTIALS or t == "all"]
        if needs:
            yield FieldError(
                f"{path}.report_to",
                f"{', '.join(needs)} needs credentials, which args cannot carry (they are stored in a ConfigMap): "
                "use spec.tracking (wandb/mlflow with a Secret reference)",
            )


def _ref_errors(path: str, ref: SecretKeyRef | None) -> Iterator[FieldError]:
    if ref is None:
        return
    if ref.name is not None and not patterns.DNS_SUBDOMAIN_RE.match(ref.name):
        yield FieldError(f"{path}.name", "must be a Secret name (DNS-1123 subdomain)")
    if ref.key is not None and not patterns.SECRET_KEY_RE.match(ref.key):
        yield FieldError(f"{path}.key", "must be a Secret key (letters, digits, '-', '_', '.')")


@rule
def tracking_secret_refs_valid(ctx: Context) -> Iterator[FieldError]:
    tracking = ctx.spec.tracking
    if tracking is None:
        return
    if tracking.wandb is not None:
        yield from _ref_errors("spec.tracking.wandb.apiKeySecretRef", tracking.wandb.api_key_secret_ref)
    if tracking.mlflow is not None:
        ml = tracking.mlflow
        yield from _ref_errors("spec.tracking.mlflow.tokenSecretRef", ml.token_secret_ref)
        yield from _ref_errors("spec.tracking.mlflow.usernameSecretRef", ml.username_secret_ref)
        yield from _ref_errors("spec.tracking.mlflow.passwordSecretRef", ml.password_secret_ref)
        if (ml.username_secret_ref is None) != (ml.password_secret_ref is None):
            yield FieldError("spec.tracking.mlflow", "set both usernameSecretRef and passwordSecretRef, or neither")
