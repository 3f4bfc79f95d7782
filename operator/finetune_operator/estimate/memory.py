"""Peak GPU memory of one training process, in bytes, broken down the way it is spent.

The accounting (why each term is what it is) -- ``bench/README.md`` records the sources and the measured errors:

* **Weights.** LLaMA-Factory loads the checkpoint in its own dtype (``torch_dtype`` in config.json: bf16 for
  every current release, 2 bytes) and casts *trainable* parameters to fp32 unless ``pure_bf16``; QLoRA
  stores decoder linear weights in 4-bit NF4 with double-quantised block constants (4.127 bits per weight);
  embeddings, norms and ``lm_head`` stay 16-bit.
  DeepSpeed casts the module to the compute dtype and keeps the fp32 master copy in the optimizer.
* **Gradients** have the trainable weights' dtype. DDP without DeepSpeed keeps a second copy in its
  communication buckets when there is more than one process.
* **Optimizer states**: AdamW's two moments (8 bytes per trainable parameter; 2 for 8-bit AdamW), plus the
  fp32 master weights (4) under DeepSpeed mixed precision. ZeRO-1 partitions optimizer states over the
  data-parallel ranks, ZeRO-2 also gradients, ZeRO-3 also weights (Rajbhandari et al., *ZeRO*, 2020: the
  7.5 B / 64 GPU example gives 120, 31.4, 16.6 and 1.9 GB, reproduced in the tests). Offload moves optimizer
  states (and with ZeRO-3 the weights) to CPU memory; ZeRO-3 then holds only the gathered layers on the GPU.
* **Activations** per token and layer, counted from what autograd saves in a Llama-style layer with fused
  (SDPA/flash) attention: each RMSNorm saves its fp32 input and its normalised output, attention saves q, k,
  v, its output and the o_proj input, the SwiGLU MLP saves gate, up, act(gate) and their product. With
  gradient checkpointing (LLaMA-Factory's default) only each layer's input survives the forward pass and one
  layer is recomputed at a time.
* **Logits**: the ``lm_head`` output over the whole vocabulary, its fp32 copy for the loss, the saved
  log-softmax and the logits' gradient -- at a 128 k vocabulary often the largest activation of all.
* **Reference model**: DPO/KTO with full or freeze tuning keep a frozen copy (LoRA reuses the base model
  with the adapter switched off).
* **Overhead**: the CUDA context and library workspaces (a fixed 1 GiB) and caching-allocator fragmentation
  (5 % of the dynamic memory).

Preference stages (dpo, rm) run chosen and rejected answers in one batch: twice the sequences.
The constants marked *calibrated* were checked against peaks measured on CPU (``bench/memory_calibration.py``);
``bench/README.md`` records every comparison.
"""

from __future__ import annotations

from dataclasses import dataclass

from finetune_operator.estimate.settings import OPTIMIZER_STATE_BYTES, TrainSettings
from finetune_operator.estimate.shape import ModelShape

GIB = float(1 << 30)
#: NF4 with double quantisation: 4 bits + 8-bit absmax per 64 weights + fp32 per 256 absmax blocks.
NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)
#: CUDA context, cuBLAS and NCCL workspaces.
FIXED_OVERHEAD = 1.0 * GIB
#: Caching-allocator fragmentation, as a share of the dynamic memory.
FRAGMENTATION = 0.05
#: DeepSpeed ZeRO-1/2 communication buckets (elements): render.deepspeed.BUCKET_SIZE.
ZERO_BUCKET = 500_000_000
#: Share of the adapted modules' input widths saved again as 16-bit copies under LoRA + mixed precision
#: (*calibrated*: bf16 LoRA on CPU measured between 0.4 and 0.6; see bench/README.md).
ADAPTER_INPUT_SHARE = 0.5
#: Bytes per logit alive at the loss: the fp32 logits for the loss, the saved log-softmax and the gradient
#: (*calibrated*: 11.7 measured in fp32, 12.1 in bf16, where the 16-bit lm_head output is freed after the upcast).
LOGIT_BYTES = 12
#: ZeRO-3 keeps the layer being computed and the prefetched next one gathered.
ZERO3_LIVE_LAYERS = 2


@dataclass(frozen=True)
class Breakdown:
    """Per-GPU peak memory, by cause (bytes)."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    logits: float
    reference_model: float
    overhead: float
    total_params: int
    trainable_params: int
    weights_dtype: str
    sequence_length: int
    sequences_per_step: int
    activations_without_checkpointing: float
    activations_with_checkpointing: float
    """Activations + logits at the loss with and without gradient checkpointing (for the report)."""
    peak_at: str = "backward"
    """``loss`` (activations and logits alive), ``backward`` (a checkpointed layer recomputed) or
    ``optimizer step`` (gradients + optimizer temporaries)."""

    @property
    def total(self) -> float:
        return (
            self.weights
            + self.gradients
            + self.optimizer
            + self.activations
            + self.logits
            + self.reference_model
            + self.overhead
        )

    def gib(self) -> dict[str, float]:
        """The breakdown in GiB (rounded to 0.01), as ``ftctl plan -o json`` prints it."""
        return {
            "weights": _r(self.weights),
            "gradients": _r(self.gradients),
            "optimizer": _r(self.optimizer),
            "activations": _r(self.activations),
            "logits": _r(self.logits),
            "referenceModel": _r(self.reference_model),
            "overhead": _r(self.overhead),
        }


def _r(value: float) -> float:
    return round(value / GIB, 2)


def trainable_params(shape: ModelShape, s: TrainSettings) -> int:
    """Trainable parameters for the method: all (full), the last ``freeze_trainable_layers`` (freeze),
    or the LoRA matrices ``rank x (in + out)`` of every targeted linear module (lora, qlora)."""
    if s.method == "full":
        return shape.total_params
    if s.method == "freeze":
        return min(shape.layers, abs(s.freeze_layers)) * shape.layer_params
    linears = shape.linear_shapes()
    wanted = set(linears) if "all" in s.lora_target else {t for t in s.lora_target if t in linears}
    per_layer = sum(s.lora_rank * (i + o) * n for name, (i, o, n) in linears.items() if name in wanted)
    return per_layer * shape.layers


def compute_bytes(s: TrainSettings) -> int:
    """Bytes per element of the compute dtype."""
    return 2 if s.precision in ("bf16", "fp16", "pure_bf16") else 4


def checkpoint_bytes(shape: ModelShape) -> int:
    """Bytes per weight as LLaMA-Factory loads them (``torch_dtype: auto``: the checkpoint's dtype)."""
    return 4 if (shape.dtype or "bfloat16") in ("float32", "fp32") else 2


def _mlp_width(shape: ModelShape) -> int:
    if shape.family.moe is None:
        return shape.intermediate
    return max(shape.experts_per_token * shape.expert_intermediate, shape.shared_expert_intermediate)


def _adapter_input_bytes(shape: ModelShape, s: TrainSettings, e: int) -> float:
    """peft casts each adapted module's input to the adapter's fp32 dtype; under mixed precision the adapter's
    matmul then saves its own 16-bit copy of that input. (In fp32 the input is shared: nothing extra.)"""
    if s.method not in ("lora", "qlora") or e == 4:
        return 0.0
    linears = shape.linear_shapes()
    wanted = set(linears) if "all" in s.lora_target else set(s.lora_target)
    return ADAPTER_INPUT_SHARE * e * sum(i * n for name, (i, _o, n) in linears.items() if name in wanted)


def _activation_bytes_per_token(shape: ModelShape, e: int) -> float:
    """What autograd keeps for one token in one decoder layer (no checkpointing)."""
    h, q, kv = shape.hidden, shape.heads * shape.head_dim, shape.kv_width
    norms = 2 * (4 * h + e * h)
    attention = e * (2 * q + 2 * kv)  # rotated q, k, v and the attention output (o_proj's input is a view)
    if shape.family.moe is None:
        mlp = e * 4 * shape.intermediate
    else:
        k = shape.experts_per_token
        mlp = e * (4 * k * shape.expert_intermediate + 2 * k * h + 4 * shape.shared_expert_intermediate)
    return float(norms + attention + mlp)


def estimate(shape: ModelShape, s: TrainSettings, *, seq_len: int | None = None, on_gpu: bool = True) -> Breakdown:
    """The per-GPU peak of one training process of ``s`` on a model of ``shape``.

    ``seq_len`` is the padded length of the longest batch (``cutoff_len`` when unknown; the data check
    passes the longest tokenised sample when it is shorter). ``on_gpu=False`` drops the fixed CUDA overhead
    (for comparisons with CPU measurements).
    """
    e = compute_bytes(s)
    w = checkpoint_bytes(shape)
    total = shape.total_params
    trainable = trainable_params(shape, s)
    frozen = total - trainable
    dp = s.data_parallel
    zero = s.zero_stage if s.zero_stage is not None else None
    deepspeed = zero is not None and zero > 0
    pure = s.precision == "pure_bf16"

    # ---- weights -----------------------------------------------------------------------------------------
    if s.quant_bits:
        quantised = min(shape.linear_params, frozen)
        frozen_bytes = quantised * NF4_BITS / 8 + (frozen - quantised) * w
        weights_dtype = f"nf4 ({s.quant_bits}-bit) + {'bf16' if w == 2 else 'fp32'}"
    else:
        frozen_bytes = float(frozen * w)
        weights_dtype = "bf16" if w == 2 else "fp32"
    master = 2 if pure else 4  # LLaMA-Factory upcasts trainable params to fp32
    if trainable and not deepspeed:
        weights_dtype += f", trainable {'bf16' if master == 2 else 'fp32'}"
    # DeepSpeed casts the module to the compute dtype; its fp32 master copy is optimizer state.
    trainable_weight = float(trainable * (e if deepspeed else master))
    weights = frozen_bytes + trainable_weight
    if zero == 3:
        weights /= dp
        live = ZERO3_LIVE_LAYERS * shape.layer_params * e
        weights = (0.0 if s.offload else weights) + live

    # ---- gradients ---------------------------------------------------------------------------------------
    grad_elem = e if deepspeed else master
    gradients = float(trainable * grad_elem)
    if deepspeed and zero is not None and zero >= 2:
        gradients /= dp
    if not deepspeed and dp > 1:
        gradients *= 2  # DDP's gradient buckets
    if deepspeed and zero in (1, 2):
        gradients += min(trainable, ZERO_BUCKET) * e * (2 if zero == 2 else 1)

    # ---- optimizer -----------------------------------------------------------------------------------------
    state = OPTIMIZER_STATE_BYTES.get(s.optim, 8.0)
    if pure and state == 8.0:
        state = 4.0  # moments in bf16
    if deepspeed:
        per_param = state + (4 if e == 2 else 0)  # + fp32 master
        optimizer = 0.0 if s.offload else trainable * per_param / dp
        step_temp = 0.0 if s.offload else trainable * 4 / dp
    else:
        optimizer = float(trainable * state)
        step_temp = float(trainable * master)  # foreach AdamW's sqrt(v) temporary

    # ---- activations and logits --------------------------------------------------------------------------
    seq = max(1, min(seq_len or s.cutoff_len, s.cutoff_len))
    sequences = s.micro_batch * (2 if s.paired else 1)
    tokens = seq * sequences
    layer = (_activation_bytes_per_token(shape, e) + _adapter_input_bytes(shape, s, e)) * tokens
    embed_and_final = tokens * shape.hidden * (e + 4 + e)  # embedding output, final norm's input and output
    # Backward through a layer briefly holds the gradient of the MLP's widest tensor and of the hidden state.
    backward_transient = tokens * (_mlp_width(shape) + shape.hidden) * e
    logits = float(tokens * shape.vocab * LOGIT_BYTES)
    checkpoints = shape.layers * tokens * shape.hidden * e + embed_and_final
    full_saved = shape.layers * layer + embed_and_final
    with_gc = checkpoints + max(logits, layer + backward_transient)
    without_gc = full_saved + max(logits, backward_transient)
    if s.gradient_checkpointing:
        saved, recompute = float(checkpoints), layer + backward_transient
    else:
        saved, recompute = full_saved, float(backward_transient)
    # The peak is the larger of two moments: the loss (activations and logits all alive, gradients not yet
    # produced unless they accumulate over micro-batches or live in DeepSpeed's buffers) and the optimizer step
    # (every gradient plus the optimizer's temporaries, activations gone).
    live_grads = gradients if (deepspeed or s.grad_accum > 1) else 0.0
    # Recomputing a checkpointed layer happens mid-backward: the later layers' gradients already exist.
    recompute_grads = gradients - live_grads if s.gradient_checkpointing else 0.0
    at_loss = live_grads + saved + logits
    at_recompute = live_grads + saved + recompute + recompute_grads
    step_peak = gradients + step_temp
    if step_peak > max(at_loss, at_recompute):
        activations, logit_share, peak_at = 0.0, 0.0, "optimizer step"
        optimizer_total = optimizer + step_temp
        grads_at_peak = gradients
    elif at_loss >= at_recompute:
        activations, logit_share, peak_at = saved, logits, "loss"
        optimizer_total, grads_at_peak = optimizer, live_grads
    else:
        activations, logit_share, peak_at = saved + recompute, 0.0, "backward"
        optimizer_total, grads_at_peak = optimizer, live_grads + recompute_grads

    # ---- reference model ------------------------------------------------------------------------------------
    reference = 0.0
    if s.reference_model:
        reference = float(total * w) / (dp if zero == 3 else 1)

    dynamic = weights + grads_at_peak + optimizer_total + activations + logit_share + reference
    overhead = (FIXED_OVERHEAD if on_gpu else 0.0) + FRAGMENTATION * dynamic
    return Breakdown(
        weights=weights,
        gradients=grads_at_peak,
        optimizer=optimizer_total,
        activations=activations,
        logits=logit_share,
        reference_model=reference,
        overhead=overhead,
        total_params=total,
        trainable_params=trainable,
        weights_dtype=weights_dtype,
        sequence_length=seq,
        sequences_per_step=sequences,
        activations_without_checkpointing=without_gc,
        activations_with_checkpointing=with_gc,
        peak_at=peak_at,
    )
