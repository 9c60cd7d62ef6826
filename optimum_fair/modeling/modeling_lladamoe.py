"""Native LLaDA-MoE masked-diffusion LM for transformers 5.

Parameter names equal the released checkpoints (``modeling_lladamoe.py``)::

    model.embed_tokens.weight                                    (vocab, hidden)
    model.layers.{i}.input_layernorm.weight                      (hidden,)
    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight             q/o: (hidden, hidden), k/v: (kv*hd, hidden)
    model.layers.{i}.self_attn.{q,k}_norm.weight                 (head_dim,), per-head RMS norm (qk_layernorm)
    model.layers.{i}.post_attention_layernorm.weight             (hidden,)
    model.layers.{i}.mlp.gate.weight                             (num_experts, hidden): the router
    model.layers.{i}.mlp.expert_bias                             (num_experts,), when moe_router_enable_expert_bias
    model.layers.{i}.mlp.experts.{e}.{gate,up}_proj.weight       (expert_intermediate, hidden)
    model.layers.{i}.mlp.experts.{e}.down_proj.weight            (hidden, expert_intermediate)
    model.layers.{i}.mlp.{gate,up,down}_proj.weight              dense layers (moe_layer_freq[i] == 0)
    model.layers.{i}.shared_expert.{gate,up,down}_proj.weight    when shared_expert_intermediate_size is set
    model.norm.weight, lm_head.weight

Attention is bidirectional; logits are position-aligned (logits[:, i] scores token i), as in LLaDA.
Routing follows the released block: softmax in float32, plus ``expert_bias`` when enabled, top-k,
weights not renormalised. The experts are a `modeling.experts.RoutedExperts` list of gated MLPs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init

from .configuration_lladamoe import LLaDAMoEConfig
from .experts import RoutedExperts
from .kv_cache import cached_kv, key_length
from .layers import (
    RMSNorm,
    apply_partial_rotary,
    bidirectional_attention,
    default_position_ids,
    init_dense_weights,
    prepare_attention_mask,
    rotary_cos_sin,
    run_layers,
)
from .lm_head import DiffusionLMMixin

__all__ = ["LLaDAMoEDecoderLayer", "LLaDAMoEModel", "LLaDAMoEModelLM", "LLaDAMoEPreTrainedModel",
           "LLaDAMoESparseMoeBlock"]


class LLaDAMoEAttention(nn.Module):
    """Bidirectional GQA attention with per-head q/k RMS norms, optional q/k/v clipping, partial RoPE."""

    def __init__(self, config: LLaDAMoEConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        self.dropout, self.clip = config.attention_dropout, config.clip_qkv
        h, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(h, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(h, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=bias)
        if config.qk_layernorm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def _heads(self, x: torch.Tensor, n: int, norm: nn.Module | None) -> torch.Tensor:
        # (batch, seq, n*head_dim) -> (batch, n, seq, head_dim), normalised per head when norm is set
        batch, seq, _ = x.shape
        x = x.view(batch, seq, n, self.head_dim)
        if norm is not None:
            x = norm(x)
        if self.clip is not None:
            x = x.clamp(-self.clip, self.clip)
        return x.transpose(1, 2)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None,
                position_embeddings: tuple[torch.Tensor, torch.Tensor], cache: tuple = (None, 0, None)
                ) -> torch.Tensor:
        """x: (batch, seq, hidden), normalised -> (batch, seq, hidden); cache: (past_key_values, layer index,
        cache_position) for `kv_cache.cached_kv`."""
        cos, sin = position_embeddings
        q = self._heads(self.q_proj(x), self.n_heads, getattr(self, "q_norm", None))
        k = self._heads(self.k_proj(x), self.n_kv_heads, getattr(self, "k_norm", None))
        v = self._heads(self.v_proj(x), self.n_kv_heads, None)
        q, k = apply_partial_rotary(q, cos, sin), apply_partial_rotary(k, cos, sin)
        k, v = cached_kv(cache[0], cache[1], k, v, cache[2])  # (batch, kv, keys, head_dim)
        p = self.dropout if self.training else 0.0
        return self.o_proj(bidirectional_attention(q, k, v, attn_mask, dropout_p=p))


class LLaDAMoEMLP(nn.Module):
    """``down_proj(silu(gate_proj(x)) * up_proj(x))``: dense layers, experts and the shared expert."""

    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LLaDAMoESparseMoeBlock(nn.Module):
    """Router ``gate`` + ``experts``: (batch, seq, hidden) -> (batch, seq, hidden)."""

    def __init__(self, config: LLaDAMoEConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = RoutedExperts(
            LLaDAMoEMLP(config.hidden_size, config.expert_intermediate_size) for _ in range(config.num_experts))
        if config.moe_router_enable_expert_bias:
            self.register_buffer("expert_bias", torch.zeros(config.num_experts))
        else:
            self.expert_bias = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (T, hidden) -> top-k weights (T, k) in x's dtype and expert ids (T, k)."""
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float32)  # (T, E)
        if self.expert_bias is not None:
            probs = probs + self.expert_bias
        weights, index = torch.topk(probs, self.top_k, dim=-1)
        return weights.to(x.dtype), index

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # (T, hidden)
        weights, index = self.route(x)
        return self.experts(x, index, weights).reshape(shape)


class LLaDAMoEDecoderLayer(nn.Module):
    """One pre-norm block: attention, then the MoE (or dense) MLP plus the shared expert if any.

    ``layer(hidden_states, attention_mask=None, position_embeddings=None)`` as `DreamDecoderLayer`.
    """

    def __init__(self, config: LLaDAMoEConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.rotary_dim, self.rope_theta = config.rotary_dim, config.rope_theta_value
        h = config.hidden_size
        self.input_layernorm = RMSNorm(h, config.rms_norm_eps)
        self.self_attn = LLaDAMoEAttention(config)
        self.post_attention_layernorm = RMSNorm(h, config.rms_norm_eps)
        moe = config.is_moe_layer(layer_idx)
        self.mlp = LLaDAMoESparseMoeBlock(config) if moe else LLaDAMoEMLP(h, config.dense_intermediate_size)
        if moe and config.shared_expert_intermediate_size:
            self.shared_expert = LLaDAMoEMLP(h, config.shared_expert_intermediate_size)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None, past_key_values=None,
                cache_position: torch.Tensor | None = None) -> torch.Tensor:
        batch, seq, _ = hidden_states.shape
        if position_embeddings is None:
            pos = default_position_ids(batch, seq, hidden_states.device)
            position_embeddings = rotary_cos_sin(pos, self.rotary_dim, self.rope_theta)
        kv_len = key_length(past_key_values, self.layer_idx, seq, cache_position)
        attn_mask = prepare_attention_mask(attention_mask, batch, seq, kv_len)
        h = hidden_states + self.self_attn(self.input_layernorm(hidden_states), attn_mask, position_embeddings,
                                           (past_key_values, self.layer_idx, cache_position))
        normed = self.post_attention_layernorm(h)
        out = self.mlp(normed)
        if hasattr(self, "shared_expert"):
            out = out + self.shared_expert(normed)
        return h + out


class LLaDAMoEModel(nn.Module):
    """Backbone: ``embed_tokens``, ``layers``, ``norm`` (released names)."""

    def __init__(self, config: LLaDAMoEConfig) -> None:
        super().__init__()
        self.config = config
        pad = config.pad_token_id
        padding_idx = pad if isinstance(pad, int) and 0 <= pad < config.vocab_size else None
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx)
        self.layers = nn.ModuleList(LLaDAMoEDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor,
                output_hidden_states: bool, past_key_values=None, cache_position: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """Embeddings (batch, seq, hidden) -> final normalised states (batch, seq, hidden)."""
        x = inputs_embeds
        batch, seq, _ = x.shape
        kv_len = key_length(past_key_values, 0, seq, cache_position)
        attn_mask = prepare_attention_mask(attention_mask, batch, seq, kv_len)
        rope = rotary_cos_sin(position_ids, self.config.rotary_dim, self.config.rope_theta_value)
        return run_layers(self.layers, self.norm, x, attn_mask, rope, output_hidden_states,
                          past_key_values=past_key_values, cache_position=cache_position)


class LLaDAMoEPreTrainedModel(PreTrainedModel):
    config_class = LLaDAMoEConfig
    config: LLaDAMoEConfig
    base_model_prefix = "model"
    _no_split_modules = ["LLaDAMoEDecoderLayer"]
    supports_gradient_checkpointing = False
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Normal(0, initializer_range) weights, zero biases and padding row, unit norm gains."""
        init_dense_weights(module, self.config.initializer_range)
        if isinstance(module, LLaDAMoESparseMoeBlock) and module.expert_bias is not None:
            init.zeros_(module.expert_bias)


class LLaDAMoEModelLM(DiffusionLMMixin, LLaDAMoEPreTrainedModel):
    """LLaDA-MoE with its LM head (released architecture name ``LLaDAMoEModelLM``).

    ``forward(input_ids, attention_mask=None)`` returns ``CausalLMOutput`` with position-aligned
    ``logits`` (batch, seq, vocab). No loss. ``use_cache`` / ``past_key_values`` / ``cache_position``:
    Fast-dLLM's approximate KV cache (`kv_cache`).
    """

    _supports_approximate_cache = True

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LLaDAMoEConfig) -> None:
        super().__init__(config)
        self.model = LLaDAMoEModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
