"""Native configuration for LLaDA-MoE masked-diffusion language models.

Field names follow the released ``configuration_lladamoe.py`` (an OLMoE-style network: per-head
q/k norms, top-k softmax routing over ``num_experts`` gated-MLP experts, optional shared expert,
``moe_layer_freq`` marking dense layers with 0). Defaults are the LLaDA-MoE-7B-A1B values. The released
checkpoints' ``config.json`` says ``model_type: "llada"``; `LLaDAConfig.from_dict` hands such a file
here when it carries expert fields. ``rope_theta`` / ``partial_rotary_factor`` move into
``rope_parameters`` (the transformers-5 convention).
"""

from __future__ import annotations

from typing import Any, ClassVar

from transformers import PretrainedConfig

__all__ = ["LLADA_MOE_EXPERT_FIELDS", "LLADA_MOE_MASK_TOKEN_ID", "LLaDAMoEConfig"]

LLADA_MOE_MASK_TOKEN_ID = 156895  # "<|mask|>" in the released LLaDA-MoE tokenizer
LLADA_MOE_EXPERT_FIELDS = ("num_experts", "expert_intermediate_size", "num_experts_per_tok")


class LLaDAMoEConfig(PretrainedConfig):
    """LLaDA-MoE configuration (``model_type="lladamoe"``).

    Implemented: softmax routing (optionally with the released additive ``expert_bias`` buffer),
    un-normalised top-k weights (the released block fixes ``norm_topk_prob`` to False), default or
    partial RoPE, SiLU experts. ``router_num_group`` / ``router_topk_group`` / ``routed_scaling_factor``
    are stored for round trips; the released forward does not read them, nor does this one.
    """

    model_type: ClassVar[str] = "lladamoe"
    keys_to_ignore_at_inference: ClassVar[list[str]] = ["past_key_values"]
    default_theta: ClassVar[float] = 50000.0

    vocab_size: int = 157184
    hidden_size: int = 2048
    dense_intermediate_size: int = 8192
    expert_intermediate_size: int = 1024
    shared_expert_intermediate_size: int | None = None
    num_hidden_layers: int = 16
    num_attention_heads: int = 16
    num_key_value_heads: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 8192
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    use_cache: bool = False
    tie_word_embeddings: bool = False
    rope_parameters: dict[str, Any] | None = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    clip_qkv: float | None = None
    num_experts: int = 64
    num_experts_per_tok: int = 8
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.01
    norm_topk_prob: bool | None = None
    qk_layernorm: bool = True
    moe_layer_freq: list[int] | None = None
    moe_router_enable_expert_bias: bool | None = False
    moe_router_score_function: str | None = "softmax"
    routed_scaling_factor: float = 1.0
    router_num_group: int | None = None
    router_topk_group: int | None = None
    mask_token_id: int | None = LLADA_MOE_MASK_TOKEN_ID
    pad_token_id: int | None = 156892
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = 156892

    def __post_init__(self, **kwargs: Any) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.moe_layer_freq is None:
            self.moe_layer_freq = [1] * self.num_hidden_layers
        super().__post_init__(**kwargs)
        if self.architectures is None:
            self.architectures = ["LLaDAMoEModelLM"]
        self._validate()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rope_theta_value(self) -> float:
        return float(self.rope_parameters["rope_theta"])

    @property
    def rotary_dim(self) -> int:
        """Channels of each head that RoPE rotates (``partial_rotary_factor`` x head_dim)."""
        factor = float(self.rope_parameters.get("partial_rotary_factor", 1.0) or 1.0)
        return int(self.head_dim * factor)

    def is_moe_layer(self, layer_idx: int) -> bool:
        return self.moe_layer_freq[layer_idx] != 0

    def _validate(self) -> None:
        h, nh, nkv = self.hidden_size, self.num_attention_heads, self.num_key_value_heads
        _check(h > 0 and nh > 0 and h % nh == 0, "hidden_size", f"a positive multiple of num_attention_heads={nh}", h)
        _check(nkv > 0 and nh % nkv == 0, "num_key_value_heads", f"a positive divisor of {nh}", nkv)
        _check(self.rotary_dim % 2 == 0 and self.rotary_dim > 0, "rope_parameters",
               "partial_rotary_factor x head_dim a positive even number", self.rope_parameters)
        _check(0 < self.num_experts_per_tok <= self.num_experts, "num_experts_per_tok",
               f"in 1..num_experts={self.num_experts}", self.num_experts_per_tok)
        _check(len(self.moe_layer_freq) == self.num_hidden_layers, "moe_layer_freq",
               f"one entry per layer ({self.num_hidden_layers})", self.moe_layer_freq)
        _check(self.hidden_act == "silu", "hidden_act", "'silu'", self.hidden_act)
        _check(self.moe_router_score_function in (None, "softmax"), "moe_router_score_function", "'softmax'",
               self.moe_router_score_function)
        rope_type = (self.rope_parameters or {}).get("rope_type", "default")
        _check(rope_type == "default", "rope_parameters", "rope_type 'default'", self.rope_parameters)


def _check(ok: bool, field: str, expected: str, got: object) -> None:
    if not ok:
        raise ValueError(f"LLaDAMoEConfig.{field}: expected {expected}, got {got!r}")
