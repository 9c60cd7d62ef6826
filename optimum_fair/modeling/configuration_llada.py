"""Native configuration for LLaDA masked-diffusion language models.

Field names and meanings follow the ``config.json`` shipped with the released
GSAI-ML LLaDA checkpoints, so a released file loads unchanged; its ``auto_map``
entry is kept as data and never executed. Defaults are the LLaDA-8B values.
Standard transformers names (``hidden_size``, ``num_attention_heads``, ...) are
aliases of the released names through ``attribute_map``.
"""

from __future__ import annotations

from typing import Any, ClassVar

from transformers import PretrainedConfig

from .configuration_lladamoe import LLADA_MOE_EXPERT_FIELDS, LLaDAMoEConfig

__all__ = ["LLADA_MASK_TOKEN_ID", "LLaDAConfig"]

LLADA_MASK_TOKEN_ID = 126336  # "<|mdm_mask|>" in every released LLaDA tokenizer


class LLaDAConfig(PretrainedConfig):
    """LLaDA configuration (``model_type="llada"``).

    Only the released architecture is implemented: ``block_type="llama"``,
    RMS norms with a gain and no bias, rotary embeddings, SiLU-gated MLP. Other
    released switches (``alibi``, ``flash_attention``, ``init_*``, ``precision``,
    ...) are stored so the file round-trips; values the model cannot honour raise
    ``ValueError``.

    ``mask_token_id`` defaults to 126336 (the id every released LLaDA checkpoint
    uses). Set it to ``None`` explicitly to mark a model without a mask token;
    :func:`optimum_fair.modeling.require_mask_token_id` then raises.
    """

    model_type: ClassVar[str] = "llada"
    keys_to_ignore_at_inference: ClassVar[list[str]] = ["past_key_values"]
    attribute_map: ClassVar[dict[str, str]] = {
        "hidden_size": "d_model",
        "num_attention_heads": "n_heads",
        "num_hidden_layers": "n_layers",
        "num_key_value_heads": "n_kv_heads",
        "max_position_embeddings": "max_sequence_length",
        "tie_word_embeddings": "weight_tying",
    }

    # -- shapes
    d_model: int = 4096
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: n_heads (or 1 with multi_query_attention)
    n_layers: int = 32
    mlp_ratio: int = 4
    mlp_hidden_size: int | None = 12288  # None: mlp_ratio * d_model
    vocab_size: int = 126464
    embedding_size: int | None = 126464  # rows of wte / columns of the logits; None: vocab_size
    max_sequence_length: int = 4096
    # -- architecture switches (released names)
    activation_type: str = "silu"
    block_type: str = "llama"
    block_group_size: int = 1
    alibi: bool = False
    alibi_bias_max: float = 8.0
    rope: bool = True
    rope_full_precision: bool = True
    rope_theta: float = 500000.0
    flash_attention: bool = False
    multi_query_attention: bool | None = None
    attention_layer_norm: bool = False
    attention_layer_norm_with_affine: bool = True
    input_emb_norm: bool = False
    layer_norm_type: str = "rms"
    layer_norm_with_affine: bool = True
    bias_for_layer_norm: bool | None = False
    rms_norm_eps: float = 1e-5
    include_bias: bool = False
    include_qkv_bias: bool | None = False
    scale_logits: bool = False
    weight_tying: bool = False
    # -- dropouts
    attention_dropout: float = 0.0
    residual_dropout: float = 0.0
    embedding_dropout: float = 0.0
    # -- initialisation / training bookkeeping (stored, init_std used by _init_weights)
    init_device: str | None = None
    init_fn: str = "mitchell"
    init_std: float = 0.02
    init_cutoff_factor: float | None = None
    precision: str | None = None
    use_cache: bool = False
    # -- special tokens
    eos_token_id: int | None = 126081
    pad_token_id: int | None = 126081
    bos_token_id: int | None = None
    mask_token_id: int | None = LLADA_MASK_TOKEN_ID

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any):
        """A released LLaDA-MoE ``config.json`` also says ``model_type: "llada"``: one with expert fields
        becomes a `LLaDAMoEConfig` (and so loads `LLaDAMoEModelLM`)."""
        if cls is LLaDAConfig and any(f in config_dict for f in LLADA_MOE_EXPERT_FIELDS):
            moe = {k: v for k, v in config_dict.items() if k != "model_type"}
            return LLaDAMoEConfig.from_dict(moe, **kwargs)
        return super().from_dict(config_dict, **kwargs)

    def __post_init__(self, **kwargs) -> None:
        self._check_alias_conflicts(kwargs)
        super().__post_init__(**kwargs)
        if self.architectures is None:
            self.architectures = ["LLaDAModelLM"]
        self.n_kv_heads = self.effective_n_kv_heads
        self._validate()

    def _check_alias_conflicts(self, kwargs: dict) -> None:
        """Refuse e.g. ``d_model=64, hidden_size=32``: the alias would silently win."""
        fields = self.__dataclass_fields__
        for alias, name in self.attribute_map.items():
            if alias in kwargs and getattr(self, name) not in (fields[name].default, kwargs[alias]):
                raise ValueError(
                    f"LLaDAConfig.{name}: got {getattr(self, name)!r} and its alias {alias}={kwargs[alias]!r}; "
                    "expected one of them, or equal values"
                )

    @property
    def effective_n_kv_heads(self) -> int:
        """Key/value heads after resolving ``n_kv_heads`` and ``multi_query_attention``."""
        if self.n_kv_heads is not None:
            return self.n_kv_heads
        return 1 if self.multi_query_attention else self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def effective_mlp_hidden_size(self) -> int:
        return self.mlp_hidden_size if self.mlp_hidden_size is not None else self.mlp_ratio * self.d_model

    @property
    def effective_embedding_size(self) -> int:
        return self.embedding_size if self.embedding_size is not None else self.vocab_size

    def _validate(self) -> None:
        _check(self.d_model > 0 and self.n_heads > 0 and self.d_model % self.n_heads == 0,
               "d_model", f"a positive multiple of n_heads={self.n_heads}", self.d_model)
        _check((self.d_model // self.n_heads) % 2 == 0, "d_model", "d_model / n_heads even (RoPE)", self.d_model)
        _check(self.n_kv_heads > 0 and self.n_heads % self.n_kv_heads == 0,
               "n_kv_heads", f"a positive divisor of n_heads={self.n_heads}", self.n_kv_heads)
        _check(self.n_layers > 0, "n_layers", "a positive int", self.n_layers)
        _check(self.effective_embedding_size >= self.vocab_size,
               "embedding_size", f"None or >= vocab_size={self.vocab_size}", self.embedding_size)
        _check(self.block_type == "llama", "block_type", "'llama' (the released LLaDA block)", self.block_type)
        _check(self.activation_type == "silu", "activation_type", "'silu'", self.activation_type)
        _check(self.layer_norm_type == "rms", "layer_norm_type", "'rms'", self.layer_norm_type)
        _check(self.layer_norm_with_affine, "layer_norm_with_affine", "True", self.layer_norm_with_affine)
        norm_bias = self.include_bias if self.bias_for_layer_norm is None else self.bias_for_layer_norm
        _check(not norm_bias, "bias_for_layer_norm", "False (RMS norms carry no bias)", self.bias_for_layer_norm)
        _check(self.rope and not self.alibi, "rope", "True with alibi=False", (self.rope, self.alibi))
        _check(not self.attention_layer_norm, "attention_layer_norm", "False", self.attention_layer_norm)
        _check(self.block_group_size == 1, "block_group_size", "1", self.block_group_size)


def _check(ok: bool, field: str, expected: str, got: object) -> None:
    if not ok:
        raise ValueError(f"LLaDAConfig.{field}: expected {expected}, got {got!r}")
