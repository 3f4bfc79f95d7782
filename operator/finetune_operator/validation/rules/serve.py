"""Serving: vLLM sizing, the flags the operator owns, and what vLLM can serve without a merge.

Decisions:

- ``merge.enabled`` without any LoRA stage is valid: the export re-shards the full model (``exportSize``).
- ``serve.env`` may not set the variables the operator sets (:data:`~finetune_operator.render.serve.OWNED_ENV`)
  nor loader variables (``LD_PRELOAD``, ``PYTHONPATH``, ...); secrets come through ``valueFrom.secretKeyRef``
  and the API key through ``apiKeySecretRef``, never as text in ``env`` or ``args``.
- An abbreviation of an operator-owned vLLM flag (``--por`` for ``--port``) is refused like the flag itself.
- Serving without merge after LoRA stages serves the base model plus the adapter (vLLM ``--enable-lora``);
  vLLM cannot stack adapters, so this is rejected when the final model is more than one stacked adapter.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from finetune_operator.errors import FieldError
from finetune_operator.render.serve import API_KEY_ENV, LOADER_ENV, OWNED_ENV
from finetune_operator.validation.context import Context
from finetune_operator.validation.registry import rule

#: vLLM flags the renderer sets from spec fields.
SERVE_OWNED_FLAGS: Mapping[str, str] = {
    "--model": "the pipeline's result",
    "--served-model-name": "spec.serve.servedModelName",
    "--tensor-parallel-size": "spec.serve.tensorParallelSize",
    "-tp": "spec.serve.tensorParallelSize",
    "--max-model-len": "spec.serve.maxModelLen",
    "--max-lora-rank": "spec.serve.maxLoraRank",
    "--enable-lora": "the pipeline (set when adapters are served without merge)",
    "--lora-modules": "the pipeline (set when adapters are served without merge)",
    "--port": "the operator (port 8000)",
    "--host": "the operator",
    "--api-key": "spec.serve.apiKeySecretRef (a Secret: a key on the command line is stored in the Deployment)",
}


def owned_flag(flag: str) -> str | None:
    """The operator-owned vLLM flag ``flag`` names: itself, or one it abbreviates (vLLM's argparse accepts an
    unambiguous prefix: ``--por`` is ``--port``)."""
    if flag in SERVE_OWNED_FLAGS:
        return flag
    if flag.startswith("--") and len(flag) > 2:
        for owned in SERVE_OWNED_FLAGS:
            if owned.startswith(flag):
                return owned
    return None


@rule
def serve_tensor_parallel_fits(ctx: Context) -> Iterator[FieldError]:
    serve = ctx.spec.serve
    gpus = serve.resources.gpus_per_node if serve.resources is not None else 1
    tp = serve.tensor_parallel_size
    if gpus > 0 and tp > gpus:
        yield FieldError(
            "spec.serve.tensorParallelSize",
            f"tensorParallelSize {tp} is larger than the GPUs of each vLLM pod "
            f"(spec.serve.resources.gpusPerNode = {gpus})",
        )


@rule
def serve_args_not_owned(ctx: Context) -> Iterator[FieldError]:
    for j, arg in enumerate(ctx.spec.serve.args):
        flag = arg.split("=", 1)[0]
        owned = owned_flag(flag)
        if owned is None:
            continue
        named = flag if owned == flag else f"{flag} (an abbreviation of {owned})"
        yield FieldError(f"spec.serve.args[{j}]", f"{named} is set by the operator: use {SERVE_OWNED_FLAGS[owned]}")


@rule
def serve_env_allowed(ctx: Context) -> Iterator[FieldError]:
    """``serve.env`` tunes vLLM; it may not undo the operator's settings, load other code, or carry secrets."""
    seen: dict[str, int] = {}
    for j, var in enumerate(ctx.spec.serve.env):
        if var is None or var.name is None:
            continue
        path = f"spec.serve.env[{j}]"
        if var.name == API_KEY_ENV:
            yield FieldError(f"{path}.name", f"{API_KEY_ENV} is set by the operator: use spec.serve.apiKeySecretRef")
        elif var.name in OWNED_ENV:
            yield FieldError(f"{path}.name", f"{var.name} is set by the operator and cannot be overridden")
        elif var.name in LOADER_ENV:
            yield FieldError(f"{path}.name", f"{var.name} changes which code runs in the vLLM container: not allowed")
        if var.value and var.value_from is not None:
            yield FieldError(path, "set either value or valueFrom, not both")
        if var.name in seen:
            yield FieldError(f"{path}.name", f"duplicate variable {var.name!r} (also spec.serve.env[{seen[var.name]}])")
        else:
            seen[var.name] = j


@rule
def serve_unmerged_adapters(ctx: Context) -> Iterator[FieldError]:
    """Without merge, vLLM serves the base model plus *one* adapter: it cannot stack adapters."""
    serve, merge = ctx.spec.serve, ctx.spec.merge
    if serve.enabled is not True or merge.enabled is True:
        return
    walked, index = ctx.chain()
    if len(walked.adapters) > 1:
        names = ", ".join(f"spec.stages[{index[i]}]" for i in walked.adapters)
        yield FieldError(
            "spec.merge.enabled",
            f"serving without merge supports a single LoRA adapter, but {names} "
            "stack adapters: set merge.enabled: true",
        )
    if serve.max_lora_rank is None:
        return
    for i, rank in zip(walked.adapters, walked.ranks, strict=True):
        if rank > serve.max_lora_rank:
            yield FieldError(
                "spec.serve.maxLoraRank",
                f"maxLoraRank {serve.max_lora_rank} is smaller than the LoRA rank {rank} of spec.stages[{index[i]}]",
            )
