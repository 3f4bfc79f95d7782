"""Serving: vLLM sizing, the flags the operator owns, and what vLLM can serve without a merge.

Decisions:

- ``merge.enabled`` without any LoRA stage is valid: the export re-shards the full model (``exportSize``).
- Serving without merge after LoRA stages serves the base model plus the adapter (vLLM ``--enable-lora``);
  vLLM cannot stack adapters, so this is rejected when the final model is more than one stacked adapter.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from finetune_operator.errors import FieldError
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
}


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
        if flag in SERVE_OWNED_FLAGS:
            yield FieldError(f"spec.serve.args[{j}]", f"{flag} is set by the operator: use {SERVE_OWNED_FLAGS[flag]}")


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
