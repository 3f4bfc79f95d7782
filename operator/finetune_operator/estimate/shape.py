"""A model's shape, read from its ``config.json``, and its parameter count.

The estimator never loads weights: every number it needs follows from the handful of sizes every decoder-only
``config.json`` carries (hidden size, layers, heads, key/value heads, MLP width, vocabulary, tied embeddings,
and for mixture-of-experts models the expert count and width). Families differ in details that matter for an
exact count (Qwen2 has biases on q/k/v, Qwen2-MoE adds a shared expert, Qwen3 normalises q and k per head);
those details are data in :data:`FAMILIES`, a registry keyed by ``model_type``, not branches in the code.
Unknown ``model_type`` values that carry the standard keys are counted as a Llama-style decoder and the plan
says so; anything else is a clear error naming the missing key.

The counts reproduce the published totals: Llama 3 8B 8.03 B, Qwen2 7B 7.62 B, Mistral 7B 7.25 B,
Mixtral 8x7B 46.7 B (12.9 B active) -- see ``tests/test_estimate.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class ShapeError(ValueError):
    """config.json lacks a size the estimate needs (the message names the key)."""


@dataclass(frozen=True)
class Family:
    """Per-``model_type`` facts that change the parameter count."""

    qkv_bias: bool = False
    """Biases on the q/k/v projections (Qwen2)."""
    qk_norm: bool = False
    """Per-head RMSNorm of q and k (Qwen3)."""
    moe: str | None = None
    """Mixture-of-experts layout: ``mixtral`` (routed experts only) or ``qwen2_moe`` (plus a shared expert)."""


#: model_type -> family facts. Llama-style decoders (RMSNorm, rotary, GQA, SwiGLU) share the defaults.
FAMILIES: dict[str, Family] = {
    "llama": Family(),
    "mistral": Family(),
    "qwen2": Family(qkv_bias=True),
    "qwen3": Family(qk_norm=True),
    "mixtral": Family(moe="mixtral"),
    "qwen2_moe": Family(qkv_bias=True, moe="qwen2_moe"),
    "qwen3_moe": Family(qk_norm=True, moe="mixtral"),
}


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder-only transformer (names as in ``config.json``)."""

    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    family: Family
    known_family: bool
    experts: int = 0
    experts_per_token: int = 0
    expert_intermediate: int = 0
    shared_expert_intermediate: int = 0
    dtype: str | None = None

    # ---- parameter counts -------------------------------------------------------------------------------
    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def lm_head_params(self) -> int:
        return 0 if self.tied else self.vocab * self.hidden

    def linear_shapes(self) -> dict[str, tuple[int, int, int]]:
        """Linear modules of one layer that LoRA can adapt: name -> (in, out, count per layer).

        For MoE models only the attention projections and the shared expert are listed: the routed experts are
        fused 3-D parameters in transformers 5 (not ``nn.Linear``), so LLaMA-Factory's ``lora_target: all``
        does not reach them.
        """
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        out = {"q_proj": (h, q, 1), "k_proj": (h, kv, 1), "v_proj": (h, kv, 1), "o_proj": (q, h, 1)}
        if self.family.moe is None:
            out.update({"gate_proj": (h, self.intermediate, 1), "up_proj": (h, self.intermediate, 1)})
            out["down_proj"] = (self.intermediate, h, 1)
        elif self.shared_expert_intermediate:
            si = self.shared_expert_intermediate
            out.update({"gate_proj": (h, si, 1), "up_proj": (h, si, 1), "down_proj": (si, h, 1)})
        return out

    @property
    def attention_params(self) -> int:
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        n = h * q + 2 * h * kv + q * h
        if self.family.qkv_bias:
            n += q + 2 * kv
        if self.family.qk_norm:
            n += 2 * self.head_dim
        return n

    @property
    def mlp_params(self) -> int:
        """MLP parameters of one layer (all experts for MoE)."""
        h = self.hidden
        if self.family.moe is None:
            return 3 * h * self.intermediate
        n = self.experts * 3 * h * self.expert_intermediate + h * self.experts  # experts + router
        if self.shared_expert_intermediate:
            n += 3 * h * self.shared_expert_intermediate + h  # shared expert + its gate
        return n

    @property
    def active_mlp_params(self) -> int:
        """MLP parameters one token passes through (top-k experts for MoE)."""
        if self.family.moe is None:
            return self.mlp_params
        h = self.hidden
        n = self.experts_per_token * 3 * h * self.expert_intermediate + h * self.experts
        if self.shared_expert_intermediate:
            n += 3 * h * self.shared_expert_intermediate + h
        return n

    @property
    def layer_params(self) -> int:
        return self.attention_params + self.mlp_params + 2 * self.hidden

    @property
    def total_params(self) -> int:
        return self.embedding_params + self.lm_head_params + self.layers * self.layer_params + self.hidden

    @property
    def active_params(self) -> int:
        """Parameters used per token (== total for dense models)."""
        per_layer = self.attention_params + self.active_mlp_params + 2 * self.hidden
        return self.embedding_params + self.lm_head_params + self.layers * per_layer + self.hidden

    @property
    def linear_params(self) -> int:
        """Parameters inside the decoder layers' linear weights (what 4-bit quantization shrinks)."""
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h
        return self.layers * (attn + self.mlp_params - (h * self.experts if self.family.moe else 0))

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim


def _int(cfg: Mapping[str, Any], *keys: str, default: int | None = None) -> int:
    for key in keys:
        value = cfg.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    if default is not None:
        return default
    raise ShapeError(f"config.json has no positive integer {' / '.join(keys)}")


def _text_config(cfg: Mapping[str, Any]) -> Mapping[str, Any]:
    """Multimodal wrappers keep the language model's sizes under ``text_config``."""
    inner = cfg.get("text_config")
    if isinstance(inner, Mapping) and "hidden_size" in inner:
        return inner
    return cfg


def shape_from_config(config: Mapping[str, Any]) -> ModelShape:
    """Read a ``config.json`` dict. Raises :class:`ShapeError` naming the missing key."""
    cfg = _text_config(config)
    model_type = str(cfg.get("model_type") or config.get("model_type") or "unknown")
    family = FAMILIES.get(model_type, Family())
    hidden = _int(cfg, "hidden_size", "n_embd", "d_model")
    heads = _int(cfg, "num_attention_heads", "n_head")
    kv_heads = _int(cfg, "num_key_value_heads", default=heads)
    head_dim = _int(cfg, "head_dim", default=hidden // heads)
    experts = 0
    per_token = 0
    expert_inter = 0
    shared_inter = 0
    if family.moe is not None:
        experts = _int(cfg, "num_local_experts", "num_experts", "n_routed_experts")
        per_token = _int(cfg, "num_experts_per_tok")
        expert_inter = _int(cfg, "moe_intermediate_size", "intermediate_size")
        if family.moe == "qwen2_moe":
            shared_inter = _int(cfg, "shared_expert_intermediate_size", default=0)
    dtype = cfg.get("torch_dtype") or cfg.get("dtype") or config.get("torch_dtype")
    return ModelShape(
        model_type=model_type,
        hidden=hidden,
        layers=_int(cfg, "num_hidden_layers", "n_layer"),
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate=_int(cfg, "intermediate_size", default=expert_inter or 4 * hidden),
        vocab=_int(cfg, "vocab_size"),
        tied=bool(cfg.get("tie_word_embeddings", config.get("tie_word_embeddings", False))),
        family=family,
        known_family=model_type in FAMILIES,
        experts=experts,
        experts_per_token=per_token,
        expert_intermediate=expert_inter,
        shared_expert_intermediate=shared_inter,
        dtype=str(dtype) if dtype else None,
    )
