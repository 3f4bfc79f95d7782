"""DeepSpeed ZeRO configurations (``ds_<stage>.json``), in the form the HF Trainer expects.

Values the Trainer knows better than the spec (batch sizes, gradient clipping, mixed precision, bucket sizes
derived from the model's hidden size) are ``"auto"``: the Trainer fills them from LLaMA-Factory's arguments at
start-up, so ``args.per_device_train_batch_size`` or ``args.bf16`` in a stage can never disagree with the
DeepSpeed config. The shapes follow DeepSpeed's documented ZeRO options; every combination the API allows is
checked against ``deepspeed.runtime.config.DeepSpeedConfig`` in the tests.

Combinations:

* ZeRO-0: plain data parallelism (DeepSpeed only for its fused optimizer/communication); no offload.
* ZeRO-1/2: optimizer state (and gradients with 2) partitioned; ``offload`` moves optimizer state to CPU.
* ZeRO-3: parameters partitioned as well; ``offload`` moves optimizer state *and* parameters to CPU.
  ``stage3_gather_16bit_weights_on_model_save`` is on so that the saved model is a normal full checkpoint
  that merge, serve and ``transformers`` can load.
"""

from __future__ import annotations

from typing import Any

from finetune_operator.api.types import DeepSpeedSpec
from finetune_operator.errors import RenderError

#: Bucket sizes used for ZeRO-0/1/2 (DeepSpeed's documented default order of magnitude).
BUCKET_SIZE = 500_000_000
#: ZeRO-3 limits on live/reused parameters (elements).
STAGE3_LIMIT = 1_000_000_000


def _offload(device: str = "cpu") -> dict[str, Any]:
    return {"device": device, "pin_memory": True}


def deepspeed_config(spec: DeepSpeedSpec) -> dict[str, Any]:
    """The DeepSpeed JSON for one stage. Raises :class:`RenderError` for offload with ZeRO-0."""
    stage = spec.zero_stage
    if spec.offload and stage == 0:
        raise RenderError("DeepSpeed offload needs ZeRO stage 1, 2 or 3 (zeroStage 0 has nothing to offload)")
    zero: dict[str, Any] = {"stage": stage}
    if stage in (0, 1, 2):
        zero.update(
            {
                "allgather_partitions": True,
                "allgather_bucket_size": BUCKET_SIZE,
                # overlap_comm trades memory for speed and has caused hangs/NaNs with small buckets; the
                # conservative choice is the one LLaMA-Factory's own templates make.
                "overlap_comm": False,
                "reduce_scatter": True,
                "reduce_bucket_size": BUCKET_SIZE,
                "contiguous_gradients": True,
            }
        )
        if stage == 2:
            zero["round_robin_gradients"] = True
        if spec.offload:
            zero["offload_optimizer"] = _offload()
    else:
        zero.update(
            {
                "overlap_comm": False,
                "contiguous_gradients": True,
                "sub_group_size": STAGE3_LIMIT,
                "reduce_bucket_size": "auto",
                "stage3_prefetch_bucket_size": "auto",
                "stage3_param_persistence_threshold": "auto",
                "stage3_max_live_parameters": STAGE3_LIMIT,
                "stage3_max_reuse_distance": STAGE3_LIMIT,
                "stage3_gather_16bit_weights_on_model_save": True,
            }
        )
        if spec.offload:
            zero["offload_optimizer"] = _offload()
            zero["offload_param"] = _offload()
    return {
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        # LLaMA-Factory may pick optimizers DeepSpeed has not certified for ZeRO (e.g. adamw_torch).
        "zero_allow_untested_optimizer": True,
        "fp16": {
            "enabled": "auto",
            "loss_scale": 0,
            "loss_scale_window": 1000,
            "initial_scale_power": 16,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        "bf16": {"enabled": "auto"},
        "zero_optimization": zero,
    }
