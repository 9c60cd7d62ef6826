"""Native configuration for LLaDA2 (``llada2_moe``) block-diffusion mixture-of-experts LMs.

Field names and defaults follow the released ``configuration_llada2_moe.py`` (a BailingMoE-V2 network:
fused ``query_key_value``, sigmoid routing with an expert bias and group-limited top-k, shared experts,
``first_k_dense_replace`` dense layers first). LLaDA2.0 mini / flash checkpoints override most values
in their ``config.json``. ``rope_theta`` / ``partial_rotary_factor`` move into ``rope_parameters``.
"""

from __future__ import annotations

from typing import Any, ClassVar

from transformers import PretrainedConfig

__all__ = ["LLADA2_MASK_TOKEN_ID", "LLaDA2MoeConfig"]

LLADA2_MASK_TOKEN_ID = 156895  # "<|mask|>", the released generate()'s default mask_id


class LLaDA2MoeConfig(PretrainedConfig):
    """LLaDA2 configuration (``model_type="llada2_moe"``).

    Implemented: full attention with default or partial RoPE, SiLU experts, the released router.
    ``num_shared_experts`` 0 or None means no shared expert. Dropout fields are stored (the model runs
    in eval mode for everything this package does).
    """

    model_type: ClassVar[str] = "llada2_moe"
    keys_to_ignore_at_inference: ClassVar[list[str]] = ["past_key_values"]
    default_theta: ClassVar[float] = 10000.0

    vocab_size: int = 30592
    hidden_size: int = 1024
    intermediate_size: int | None = None
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_key_value_heads: int = 0
    hidden_act: str = "silu"
    use_qkv_bias: bool = False
    use_qk_norm: bool = True
    use_bias: bool = True
    rms_norm_eps: float = 1e-5
    norm_head: bool = False
    tie_word_embeddings: bool = False
    embedding_dropout: float = 0.1
    attention_dropout: float = 0.1
    output_dropout: float = 0.1
    initializer_range: float = 0.02
    max_position_embeddings: int = 16384
    rope_parameters: dict[str, Any] | None = None
    use_cache: bool = False
    use_sliding_window: bool = False
    sliding_window: int | None = 4096
    max_window_layers: int = 28
    pad_token_id: int | None = 126081
    eos_token_id: int | list[int] | None = 156892
    bos_token_id: int | None = None
    mask_token_id: int | None = LLADA2_MASK_TOKEN_ID
    num_experts: int = 16
    num_shared_experts: int | None = 0
    num_experts_per_tok: int = 2
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    moe_intermediate_size: int | None = None
    first_k_dense_replace: int = 0
    head_dim: int | None = None
    output_router_logits: bool = False

    def __post_init__(self, **kwargs: Any) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if not self.num_key_value_heads:
            self.num_key_value_heads = self.num_attention_heads
        kwargs.setdefault("partial_rotary_factor", 0.5)  # the released default
        super().__post_init__(**kwargs)
        if self.architectures is None:
            self.architectures = ["LLaDA2MoeModelLM"]
        self._validate()

    @property
    def rope_theta_value(self) -> float:
        return float(self.rope_parameters["rope_theta"])

    @property
    def rotary_dim(self) -> int:
        """Channels of each head that RoPE rotates (``partial_rotary_factor`` x head_dim)."""
        factor = self.rope_parameters.get("partial_rotary_factor")
        return int(self.head_dim * (1.0 if factor is None else float(factor)))

    def is_moe_layer(self, layer_idx: int) -> bool:
        return bool(self.num_experts) and layer_idx >= self.first_k_dense_replace

    def _validate(self) -> None:
        nh, nkv = self.num_attention_heads, self.num_key_value_heads
        _check(nh > 0 and nkv > 0 and nh % nkv == 0, "num_key_value_heads", f"a positive divisor of {nh}", nkv)
        _check(self.rotary_dim % 2 == 0 and self.rotary_dim > 0, "rope_parameters",
               "partial_rotary_factor x head_dim a positive even number", self.rope_parameters)
        _check(self.hidden_act == "silu", "hidden_act", "'silu'", self.hidden_act)
        _check(not self.use_sliding_window, "use_sliding_window", "False (full attention)", self.use_sliding_window)
        rope_type = (self.rope_parameters or {}).get("rope_type", "default")
        _check(rope_type == "default", "rope_parameters", "rope_type 'default'", self.rope_parameters)
        if self.num_experts:
            e, g = self.num_experts, self.n_group
            _check(g > 0 and e % g == 0, "n_group", f"a positive divisor of num_experts={e}", g)
            _check(0 < self.topk_group <= g, "topk_group", f"in 1..n_group={g}", self.topk_group)
            _check(0 < self.num_experts_per_tok <= e // g * self.topk_group, "num_experts_per_tok",
                   f"in 1..{e // g * self.topk_group} (experts in the topk_group groups)", self.num_experts_per_tok)
            _check(e // g >= 2, "n_group", "at most num_experts / 2 groups (a group is scored by its top 2)", g)
            _check(bool(self.moe_intermediate_size), "moe_intermediate_size", "a positive int",
                   self.moe_intermediate_size)
        if self.first_k_dense_replace or not self.num_experts:
            _check(bool(self.intermediate_size), "intermediate_size", "a positive int (dense layers)",
                   self.intermediate_size)


def _check(ok: bool, field: str, expected: str, got: object) -> None:
    if not ok:
        raise ValueError(f"LLaDA2MoeConfig.{field}: expected {expected}, got {got!r}")
