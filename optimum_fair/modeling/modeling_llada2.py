"""Native LLaDA2 (``llada2_moe``) block-diffusion MoE LM for transformers 5.

Parameter names equal the released checkpoints (``modeling_llada2_moe.py``)::

    model.word_embeddings.weight                                  (vocab, hidden)
    model.layers.{i}.input_layernorm.weight                       (hidden,)
    model.layers.{i}.attention.query_key_value.{weight,bias}      ((heads + 2 kv) * hd, hidden), q | k | v heads
    model.layers.{i}.attention.{query,key}_layernorm.weight       (head_dim,), per-head RMS norm (use_qk_norm)
    model.layers.{i}.attention.dense.{weight,bias}                (hidden, heads * hd)
    model.layers.{i}.post_attention_layernorm.weight              (hidden,)
    model.layers.{i}.mlp.gate.weight, mlp.gate.expert_bias        (experts, hidden), (experts,): the router
    model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight   routed experts
    model.layers.{i}.mlp.shared_experts.{gate,up,down}_proj.weight
    model.layers.{i}.mlp.{gate,up,down}_proj.weight               the first `first_k_dense_replace` layers
    model.norm.weight, lm_head.weight

Attention follows the mask it is given: LLaDA2 decodes with a block-causal 4-D mask (bidirectional
inside a block, causal across blocks, `masks.block_diffusion_mask`); without one it is bidirectional. A 2-D
(batch, seq) mask hides padded keys (the released code turns it into a causal mask, which its own
sampler never passes). Logits are position-aligned. Routing: sigmoid scores, plus ``expert_bias`` for
the choice only, the top 2 scores of each of ``n_group`` groups pick ``topk_group`` groups, the top k
experts among them, their unbiased scores renormalised (k > 1) and scaled by ``routed_scaling_factor``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init

from .configuration_llada2 import LLaDA2MoeConfig
from .experts import RoutedExperts
from .layers import (
    RMSNorm,
    apply_partial_rotary,
    bidirectional_attention,
    init_dense_weights,
    prepare_attention_mask,
    resolve_position_ids,
    rotary_cos_sin,
    run_layers,
)
from .lm_head import DiffusionLMMixin
from .modeling_lladamoe import LLaDAMoEMLP

__all__ = ["LLaDA2MoeDecoderLayer", "LLaDA2MoeModel", "LLaDA2MoeModelLM", "LLaDA2MoePreTrainedModel"]


class LLaDA2MoeAttention(nn.Module):
    """Fused q/k/v projection, per-head q/k RMS norms, partial RoPE, GQA attention under the given mask."""

    def __init__(self, config: LLaDA2MoeConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        h = config.hidden_size
        self.query_key_value = nn.Linear(h, (self.n_heads + 2 * self.n_kv_heads) * self.head_dim,
                                         bias=config.use_qkv_bias)
        if config.use_qk_norm:
            self.query_layernorm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.key_layernorm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.dense = nn.Linear(self.n_heads * self.head_dim, h, bias=config.use_bias)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None,
                position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x: (batch, seq, hidden), normalised -> (batch, seq, hidden)."""
        batch, seq, _ = x.shape
        qkv = self.query_key_value(x).view(batch, seq, self.n_heads + 2 * self.n_kv_heads, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in qkv.split([self.n_heads, self.n_kv_heads, self.n_kv_heads], dim=2))
        if hasattr(self, "query_layernorm"):  # (batch, heads, seq, head_dim), normalised per head
            q, k = self.query_layernorm(q), self.key_layernorm(k)
        cos, sin = position_embeddings
        q, k = apply_partial_rotary(q, cos, sin), apply_partial_rotary(k, cos, sin)
        return self.dense(bidirectional_attention(q, k, v, attn_mask))


class LLaDA2MoeGate(nn.Module):
    """The released router: ``weight`` (experts, hidden) and the ``expert_bias`` buffer (experts,)."""

    def __init__(self, config: LLaDA2MoeConfig) -> None:
        super().__init__()
        self.top_k, self.n_group, self.topk_group = config.num_experts_per_tok, config.n_group, config.topk_group
        self.scaling = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        self.register_buffer("expert_bias", torch.zeros(config.num_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (T, hidden) -> top-k weights (T, k) float32 and expert ids (T, k)."""
        scores = torch.sigmoid(F.linear(x.float(), self.weight.float()))  # (T, E)
        biased = scores + self.expert_bias
        tokens = x.shape[0]
        group_scores = biased.view(tokens, self.n_group, -1).topk(2, dim=-1)[0].sum(dim=-1)  # (T, n_group)
        groups = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
        keep = torch.zeros_like(group_scores).scatter_(1, groups, 1).bool()  # (T, n_group)
        keep = keep.unsqueeze(-1).expand(tokens, self.n_group, biased.shape[1] // self.n_group).reshape(tokens, -1)
        index = torch.topk(biased.masked_fill(~keep, float("-inf")), k=self.top_k, dim=-1)[1]  # (T, k)
        weights = torch.gather(scores, 1, index)
        if self.top_k > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.scaling, index


class LLaDA2MoeSparseMoeBlock(nn.Module):
    """``gate`` + routed ``experts`` + ``shared_experts``: (batch, seq, hidden) -> (batch, seq, hidden)."""

    def __init__(self, config: LLaDA2MoeConfig) -> None:
        super().__init__()
        h, inter = config.hidden_size, config.moe_intermediate_size
        self.experts = RoutedExperts(LLaDAMoEMLP(h, inter) for _ in range(config.num_experts))
        self.gate = LLaDA2MoeGate(config)
        if config.num_shared_experts:
            self.shared_experts = LLaDAMoEMLP(h, inter * config.num_shared_experts)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # (T, hidden)
        weights, index = self.gate(x)
        y = self.experts(x, index, weights).reshape(shape)
        if hasattr(self, "shared_experts"):
            y = y + self.shared_experts(hidden_states)
        return y


class LLaDA2MoeDecoderLayer(nn.Module):
    """One pre-norm block: ``layer(hidden_states, attention_mask=None, position_embeddings=(cos, sin))``."""

    def __init__(self, config: LLaDA2MoeConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.rotary_dim, self.rope_theta = config.rotary_dim, config.rope_theta_value
        h = config.hidden_size
        self.input_layernorm = RMSNorm(h, config.rms_norm_eps)
        self.attention = LLaDA2MoeAttention(config)
        self.post_attention_layernorm = RMSNorm(h, config.rms_norm_eps)
        self.mlp = (LLaDA2MoeSparseMoeBlock(config) if config.is_moe_layer(layer_idx)
                    else LLaDAMoEMLP(h, config.intermediate_size))

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        batch, seq, _ = hidden_states.shape
        if position_embeddings is None:
            pos = resolve_position_ids(None, batch, seq, hidden_states.device)
            position_embeddings = rotary_cos_sin(pos, self.rotary_dim, self.rope_theta)
        attn_mask = prepare_attention_mask(attention_mask, batch, seq)
        h = hidden_states + self.attention(self.input_layernorm(hidden_states), attn_mask, position_embeddings)
        return h + self.mlp(self.post_attention_layernorm(h))


class LLaDA2MoeModel(nn.Module):
    """Backbone: ``word_embeddings``, ``layers``, ``norm`` (released names)."""

    def __init__(self, config: LLaDA2MoeConfig) -> None:
        super().__init__()
        self.config = config
        pad = config.pad_token_id
        padding_idx = pad if isinstance(pad, int) and 0 <= pad < config.vocab_size else None
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx)
        self.layers = nn.ModuleList(LLaDA2MoeDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor,
                output_hidden_states: bool) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        x = inputs_embeds
        batch, seq, _ = x.shape
        attn_mask = prepare_attention_mask(attention_mask, batch, seq)
        rope = rotary_cos_sin(position_ids, self.config.rotary_dim, self.config.rope_theta_value)
        return run_layers(self.layers, self.norm, x, attn_mask, rope, output_hidden_states)


class LLaDA2MoePreTrainedModel(PreTrainedModel):
    config_class = LLaDA2MoeConfig
    config: LLaDA2MoeConfig
    base_model_prefix = "model"
    _no_split_modules = ["LLaDA2MoeDecoderLayer"]
    supports_gradient_checkpointing = False
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Normal(0, initializer_range) weights (the router's too), zero biases, unit norm gains."""
        init_dense_weights(module, self.config.initializer_range)
        if isinstance(module, LLaDA2MoeGate):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            init.zeros_(module.expert_bias)


class LLaDA2MoeModelLM(DiffusionLMMixin, LLaDA2MoePreTrainedModel):
    """LLaDA2 with its LM head (released architecture name ``LLaDA2MoeModelLM``).

    ``forward(input_ids, attention_mask=None, position_ids=None)`` returns ``CausalLMOutput`` with
    float32 position-aligned ``logits`` (batch, seq, vocab). No KV cache, no loss.
    """

    input_embeddings_path = "model.word_embeddings"
    _tied_weights_keys = {"lm_head.weight": "model.word_embeddings.weight"}

    def __init__(self, config: LLaDA2MoeConfig) -> None:
        super().__init__(config)
        self.model = LLaDA2MoeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def head(self, final: torch.Tensor) -> torch.Tensor:
        return self.lm_head(final).float()  # (batch, seq, vocab), float32 as released
