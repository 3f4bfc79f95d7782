"""The install's policy (:mod:`finetune_operator.validation.policy`): allowed images and ``trust_remote_code``.

Why here and not only in an admission policy: a ValidatingAdmissionPolicy can be absent (not installed, an
older cluster), so the operator refuses the same specs itself (``InvalidSpec``) before creating any pod.
"""

from __future__ import annotations

from collections.abc import Iterator

from finetune_operator.errors import FieldError
from finetune_operator.validation.context import Context
from finetune_operator.validation.registry import rule

#: vLLM's flag for running the model folder's code (argparse also accepts unambiguous abbreviations).
TRUST_REMOTE_CODE_FLAG = "--trust-remote-code"


@rule
def images_allowed(ctx: Context) -> Iterator[FieldError]:
    for path, image in (("spec.image", ctx.spec.image), ("spec.serve.image", ctx.spec.serve.image)):
        if image is not None and not ctx.policy.image_allowed(image):
            yield FieldError(
                path,
                f"image {image!r} is not allowed by this operator's install (allowed: {ctx.policy.describe_images()})",
            )


@rule
def trust_remote_code_gated(ctx: Context) -> Iterator[FieldError]:
    if ctx.policy.allow_trust_remote_code:
        return
    why = "runs the model folder's own Python code in the pod; this operator's install does not allow it"
    for i, stage in ctx.stages():
        if stage.args.get("trust_remote_code") is True:
            yield FieldError(f"spec.stages[{i}].args.trust_remote_code", f"trust_remote_code {why}")
    for j, arg in enumerate(ctx.spec.serve.args):
        flag = arg.split("=", 1)[0]
        if len(flag) > 2 and TRUST_REMOTE_CODE_FLAG.startswith(flag):
            yield FieldError(f"spec.serve.args[{j}]", f"{TRUST_REMOTE_CODE_FLAG} {why}")
