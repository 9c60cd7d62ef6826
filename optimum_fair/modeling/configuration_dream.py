"""Native configuration for Dream masked-diffusion language models.

Dream v0 is a Qwen2 network trained as a bidirectional masked-diffusion model, so
its ``config.json`` uses the Qwen2 field names plus ``mask_token_id``. Defaults
match the released ``DreamConfig`` class; the released ``auto_map`` is kept as
data and never executed. ``rope_theta`` in a released file is moved into
``rope_parameters`` (the transformers-5 convention).
"""

from __future__ import annotations

from typing import Any, ClassVar

from transformers import PretrainedConfig

__all__ = ["DREAM_MASK_TOKEN_ID", "DreamConfig"]

DREAM_MASK_TOKEN_ID = 151666  # "<|mask|>" in the released Dream tokenizer


class DreamConfig(PretrainedConfig):
    """Dream configuration (``model_type="Dream"``, case as released).

    Only full (non-sliding) attention with default RoPE and SiLU MLPs is
    implemented; other values raise ``ValueError``. ``mask_token_id`` defaults to
    151666; set it to ``None`` explicitly and
    :func:`optimum_fair.modeling.require_mask_token_id` raises.
    """

    model_type: ClassVar[str] = "Dream"
    keys_to_ignore_at_inference: ClassVar[list[str]] = ["past_key_values"]
    default_theta: ClassVar[float] = 10000.0

    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 22016
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 32
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = False
    tie_word_embeddings: bool = False
    rope_parameters: dict[str, Any] | None = None
    use_sliding_window: bool = False
    sliding_window: int | None = 4096
    max_window_layers: int = 28
    attention_dropout: float = 0.0
    mask_token_id: int | None = DREAM_MASK_TOKEN_ID
    pad_token_id: int | None = 151643
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if not self.use_sliding_window:
            self.sliding_window = None
        super().__post_init__(**kwargs)
        if self.architectures is None:
            self.architectures = ["DreamModel"]
        self._validate()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rope_theta_value(self) -> float:
        """RoPE base read from ``rope_parameters``."""
        return float(self.rope_parameters["rope_theta"])

    def _validate(self) -> None:
        h, nh, nkv = self.hidden_size, self.num_attention_heads, self.num_key_value_heads
        _check(h > 0 and nh > 0 and h % nh == 0, "hidden_size", f"a positive multiple of num_attention_heads={nh}", h)
        _check((h // nh) % 2 == 0, "hidden_size", "hidden_size / num_attention_heads even (RoPE)", h)
        _check(nkv > 0 and nh % nkv == 0, "num_key_value_heads", f"a positive divisor of {nh}", nkv)
        _check(self.num_hidden_layers > 0, "num_hidden_layers", "a positive int", self.num_hidden_layers)
        _check(self.hidden_act == "silu", "hidden_act", "'silu'", self.hidden_act)
        _check(not self.use_sliding_window, "use_sliding_window", "False (full attention)", self.use_sliding_window)
        rope_type = (self.rope_parameters or {}).get("rope_type", "default")
        _check(rope_type == "default", "rope_parameters", "rope_type 'default'", self.rope_parameters)


def _check(ok: bool, field: str, expected: str, got: object) -> None:
    if not ok:
        raise ValueError(f"DreamConfig.{field}: expected {expected}, got {got!r}")
