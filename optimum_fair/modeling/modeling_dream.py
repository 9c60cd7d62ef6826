"""Native Dream masked-diffusion LM for transformers 5.

Parameter names equal the released Dream-org checkpoints (Qwen2 names)::

    model.embed_tokens.weight                                   (vocab, hidden)
    model.layers.{i}.input_layernorm.weight                     (hidden,)
    model.layers.{i}.self_attn.{q,k,v}_proj.{weight,bias}       q: (heads*hd, hidden), k/v: (kv*hd, hidden)
    model.layers.{i}.self_attn.o_proj.weight                    (hidden, heads*hd), no bias
    model.layers.{i}.post_attention_layernorm.weight            (hidden,)
    model.layers.{i}.mlp.{gate,up}_proj.weight                  (intermediate, hidden)
    model.layers.{i}.mlp.down_proj.weight                       (hidden, intermediate)
    model.norm.weight                                           (hidden,)
    lm_head.weight                                              (vocab, hidden), tied if tie_word_embeddings

Attention is bidirectional. Logits are returned **unshifted**, as in Qwen2: the
output at position i scores the token at position i + 1, so the prediction for a
masked position j is ``logits[:, j - 1]``. Samplers and scorers apply that shift.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from .configuration_dream import DreamConfig
from .kv_cache import cached_kv, key_length
from .layers import (
    RMSNorm,
    apply_rotary,
    bidirectional_attention,
    default_position_ids,
    init_dense_weights,
    prepare_attention_mask,
    rotary_cos_sin,
    run_layers,
)
from .lm_head import DiffusionLMMixin

__all__ = ["DreamAttention", "DreamBaseModel", "DreamDecoderLayer", "DreamMLP", "DreamModel", "DreamPreTrainedModel"]


class DreamAttention(nn.Module):
    """Bidirectional GQA self-attention with rotate-half RoPE (q/k/v biased, o not)."""

    def __init__(self, config: DreamConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        self.dropout = config.attention_dropout
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(h, self.n_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(h, self.n_kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=False)

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        # (batch, seq, n*head_dim) -> (batch, n, seq, head_dim)
        batch, seq, _ = x.shape
        return x.view(batch, seq, n, self.head_dim).transpose(1, 2)

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None, position_embeddings: tuple[torch.Tensor, torch.Tensor],
        cache: tuple = (None, 0, None),
    ) -> torch.Tensor:
        """x: (batch, seq, hidden), normalised -> (batch, seq, hidden); cache: (past_key_values, layer index,
        cache_position) for `kv_cache.cached_kv`."""
        cos, sin = position_embeddings
        q = apply_rotary(self._heads(self.q_proj(x), self.n_heads), cos, sin, full_precision=False)
        k = apply_rotary(self._heads(self.k_proj(x), self.n_kv_heads), cos, sin, full_precision=False)
        v = self._heads(self.v_proj(x), self.n_kv_heads)
        k, v = cached_kv(cache[0], cache[1], k, v, cache[2])  # (batch, kv, keys, head_dim)
        p = self.dropout if self.training else 0.0
        return self.o_proj(bidirectional_attention(q, k, v, attn_mask, dropout_p=p))


class DreamMLP(nn.Module):
    """``down_proj(silu(gate_proj(x)) * up_proj(x))``, no biases."""

    def __init__(self, config: DreamConfig) -> None:
        super().__init__()
        h, inter = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, inter, bias=False)
        self.up_proj = nn.Linear(h, inter, bias=False)
        self.down_proj = nn.Linear(inter, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DreamDecoderLayer(nn.Module):
    """One pre-norm Dream (Qwen2) block.

    Call it directly (block-by-block calibration does)::

        out = layer(hidden_states, attention_mask=mask, position_embeddings=(cos, sin))

    ``hidden_states``: (batch, seq, hidden). ``attention_mask``: ``None``, a (batch, seq)
    1/0 padding mask or a prepared 4-D mask. ``position_embeddings``: (cos, sin) from
    :meth:`DreamBaseModel.rotary`, each (batch, seq, head_dim); ``None`` uses positions
    0..seq-1. Returns (batch, seq, hidden).
    """

    def __init__(self, config: DreamConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim, self.rope_theta = config.head_dim, config.rope_theta_value
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = DreamAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = DreamMLP(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        past_key_values=None,
        cache_position: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch, seq, _ = hidden_states.shape
        if position_embeddings is None:
            pos = default_position_ids(batch, seq, hidden_states.device)
            position_embeddings = rotary_cos_sin(pos, self.head_dim, self.rope_theta)
        kv_len = key_length(past_key_values, self.layer_idx, seq, cache_position)
        attn_mask = prepare_attention_mask(attention_mask, batch, seq, kv_len)
        h = hidden_states + self.self_attn(self.input_layernorm(hidden_states), attn_mask, position_embeddings,
                                           (past_key_values, self.layer_idx, cache_position))
        return h + self.mlp(self.post_attention_layernorm(h))


class DreamBaseModel(nn.Module):
    """Backbone: ``embed_tokens``, ``layers``, ``norm`` (released names)."""

    def __init__(self, config: DreamConfig) -> None:
        super().__init__()
        self.config = config
        pad = config.pad_token_id
        padding_idx = pad if isinstance(pad, int) and 0 <= pad < config.vocab_size else None
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx)
        self.layers = nn.ModuleList(DreamDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def rotary(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each (batch, seq, head_dim) float32, for ``position_ids`` (batch, seq)."""
        return rotary_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta_value)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        output_hidden_states: bool,
        past_key_values=None,
        cache_position: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """Embeddings (batch, seq, hidden) -> final normalised states (batch, seq, hidden)."""
        x = inputs_embeds
        batch, seq, _ = x.shape
        attn_mask = prepare_attention_mask(attention_mask, batch, seq, key_length(past_key_values, 0, seq,
                                                                                  cache_position))
        return run_layers(self.layers, self.norm, x, attn_mask, self.rotary(position_ids), output_hidden_states,
                          past_key_values=past_key_values, cache_position=cache_position)


class DreamPreTrainedModel(PreTrainedModel):
    """Shared transformers plumbing: config class, init, big-model dispatch hints."""

    config_class = DreamConfig
    config: DreamConfig
    base_model_prefix = "model"
    _no_split_modules = ["DreamDecoderLayer"]
    supports_gradient_checkpointing = False
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Normal(0, initializer_range) weights, zero biases and padding row, unit norm gains."""
        init_dense_weights(module, self.config.initializer_range)


class DreamModel(DiffusionLMMixin, DreamPreTrainedModel):
    """Dream with its LM head (released architecture name ``DreamModel``).

    ``forward(input_ids, attention_mask=None)`` returns ``CausalLMOutput`` whose
    ``logits`` (batch, seq, vocab) are unshifted (see the module docstring).
    ``hidden_states`` (``output_hidden_states=True``): the input of every layer, then the
    final state after ``norm`` (num_hidden_layers + 1 tensors). ``use_cache`` / ``past_key_values`` /
    ``cache_position``: Fast-dLLM's approximate KV cache (`kv_cache`).
    """

    _supports_approximate_cache = True

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DreamConfig) -> None:
        super().__init__(config)
        self.model = DreamBaseModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
