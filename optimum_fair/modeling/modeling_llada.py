"""Native LLaDA masked-diffusion LM for transformers 5.

Parameter names equal the released GSAI-ML checkpoints::

    model.transformer.wte.weight                       (embedding_size, d_model)
    model.transformer.blocks.{i}.attn_norm.weight      (d_model,)
    model.transformer.blocks.{i}.{q,k,v}_proj.weight   q: (d_model, d_model), k/v: (n_kv*head_dim, d_model)
    model.transformer.blocks.{i}.attn_out.weight       (d_model, d_model)
    model.transformer.blocks.{i}.ff_norm.weight        (d_model,)
    model.transformer.blocks.{i}.{ff_proj,up_proj}.weight  (mlp_hidden, d_model)
    model.transformer.blocks.{i}.ff_out.weight         (d_model, mlp_hidden)
    model.transformer.ln_f.weight                      (d_model,)
    model.transformer.ff_out.weight                    (embedding_size, d_model), absent if weight_tying

Attention is bidirectional; logits at position i score the token at position i.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init

from .configuration_llada import LLaDAConfig
from .kv_cache import cached_kv, key_length
from .layers import (
    RMSNorm,
    apply_rotary,
    bidirectional_attention,
    default_position_ids,
    prepare_attention_mask,
    rotary_cos_sin,
)
from .lm_head import DiffusionLMMixin

__all__ = ["LLaDABlock", "LLaDAModel", "LLaDAModelLM", "LLaDAPreTrainedModel"]


class LLaDABlock(nn.Module):
    """One pre-norm LLaDA transformer block (released ``LLaDALlamaBlock``).

    ``x + attn_out(attn(attn_norm(x)))`` then ``h + ff_out(silu(ff_proj(n)) * up_proj(n))``
    with ``n = ff_norm(h)``.

    Call it directly (block-by-block calibration does)::

        out = block(hidden_states, attention_mask=mask, position_embeddings=(cos, sin))

    ``hidden_states``: (batch, seq, d_model). ``attention_mask``: ``None``, a (batch, seq)
    1/0 padding mask or a prepared 4-D mask. ``position_embeddings``: the (cos, sin) pair
    from :meth:`LLaDAModel.rotary`, each (batch, seq, head_dim); ``None`` uses positions
    0..seq-1. Returns (batch, seq, d_model).
    """

    def __init__(self, config: LLaDAConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads = config.n_heads, config.effective_n_kv_heads
        self.head_dim, self.rope_theta = config.head_dim, config.rope_theta
        self.rope_full_precision = config.rope_full_precision
        self.attention_dropout = config.attention_dropout
        d, hidden, kv = config.d_model, config.effective_mlp_hidden_size, self.n_kv_heads * self.head_dim
        qkv_bias = bool(config.include_bias or config.include_qkv_bias)
        self.attn_norm = RMSNorm(d, config.rms_norm_eps)
        self.q_proj = nn.Linear(d, d, bias=qkv_bias)
        self.k_proj = nn.Linear(d, kv, bias=qkv_bias)
        self.v_proj = nn.Linear(d, kv, bias=qkv_bias)
        self.attn_out = nn.Linear(d, d, bias=config.include_bias)
        self.ff_norm = RMSNorm(d, config.rms_norm_eps)
        self.ff_proj = nn.Linear(d, hidden, bias=config.include_bias)
        self.up_proj = nn.Linear(d, hidden, bias=config.include_bias)
        self.ff_out = nn.Linear(hidden, d, bias=config.include_bias)
        self.dropout = nn.Dropout(config.residual_dropout)

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        # (batch, seq, n*head_dim) -> (batch, n, seq, head_dim)
        batch, seq, _ = x.shape
        return x.view(batch, seq, n, self.head_dim).transpose(1, 2)

    def attention(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
        past_key_values=None, cache_position: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Self-attention on already-normalised ``x`` (batch, seq, d_model), before ``attn_out``; with a
        cache the keys / values come from `kv_cache.cached_kv`."""
        q = self._heads(self.q_proj(x), self.n_heads)  # (batch, heads, seq, head_dim)
        k = self._heads(self.k_proj(x), self.n_kv_heads)  # (batch, kv, seq, head_dim)
        v = self._heads(self.v_proj(x), self.n_kv_heads)
        q = apply_rotary(q, cos, sin, self.rope_full_precision)
        k = apply_rotary(k, cos, sin, self.rope_full_precision)
        k, v = cached_kv(past_key_values, self.layer_idx, k, v, cache_position)  # (batch, kv, keys, head_dim)
        p = self.attention_dropout if self.training else 0.0
        return bidirectional_attention(q, k, v, attn_mask, dropout_p=p)  # (batch, seq, d_model)

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
        att = self.attention(self.attn_norm(hidden_states), attn_mask, *position_embeddings,
                             past_key_values=past_key_values, cache_position=cache_position)
        h = hidden_states + self.dropout(self.attn_out(att))
        n = self.ff_norm(h)
        mlp = self.ff_out(F.silu(self.ff_proj(n)) * self.up_proj(n))  # (batch, seq, d_model)
        return h + self.dropout(mlp)


class LLaDAModel(nn.Module):
    """Backbone holding ``transformer = {wte, blocks, ln_f[, ff_out]}`` as in the release."""

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__()
        self.config = config
        n_emb = config.effective_embedding_size
        modules: dict[str, nn.Module] = {
            "wte": nn.Embedding(n_emb, config.d_model),
            "emb_drop": nn.Dropout(config.embedding_dropout),
            "blocks": nn.ModuleList(LLaDABlock(config, i) for i in range(config.n_layers)),
            "ln_f": RMSNorm(config.d_model, config.rms_norm_eps),
        }
        if not config.weight_tying:
            modules["ff_out"] = nn.Linear(config.d_model, n_emb, bias=config.include_bias)
        self.transformer = nn.ModuleDict(modules)

    def rotary(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each (batch, seq, head_dim) float32, for ``position_ids`` (batch, seq)."""
        return rotary_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        output_hidden_states: bool,
        past_key_values=None,
        cache_position: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """Embeddings (batch, seq, d_model) -> logits (batch, seq, embedding_size); ``past_key_values`` /
        ``cache_position``: see `kv_cache`."""
        x = inputs_embeds
        if self.config.input_emb_norm:
            x = x * math.sqrt(self.config.d_model)
        x = self.transformer.emb_drop(x)
        batch, seq, _ = x.shape
        kv_len = key_length(past_key_values, 0, seq, cache_position)
        attn_mask = prepare_attention_mask(attention_mask, batch, seq, kv_len)
        rope = self.rotary(position_ids)
        states: list[torch.Tensor] = []
        for block in self.transformer.blocks:
            if output_hidden_states:
                states.append(x)  # input of each block
            x = block(x, attention_mask=attn_mask, position_embeddings=rope, past_key_values=past_key_values,
                      cache_position=cache_position)
        x = self.transformer.ln_f(x)
        if output_hidden_states:
            states.append(x)  # final, after ln_f
        if self.config.weight_tying:
            logits = F.linear(x, self.transformer.wte.weight)
        else:
            logits = self.transformer.ff_out(x)
        if self.config.scale_logits:
            logits = logits / math.sqrt(self.config.d_model)
        return logits, (tuple(states) if output_hidden_states else None)


class LLaDAPreTrainedModel(PreTrainedModel):
    """Shared transformers plumbing: config class, init, big-model dispatch hints."""

    config_class = LLaDAConfig
    config: LLaDAConfig
    base_model_prefix = "model"
    _no_split_modules = ["LLaDABlock"]
    supports_gradient_checkpointing = False
    _supports_sdpa = True
    _tied_weights_keys = None  # weight_tying reuses wte in forward; there is no second parameter

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Normal(0, init_std) for linears and embeddings, zero biases, unit norm gains."""
        std = self.config.init_std
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            init.ones_(module.weight)


class LLaDAModelLM(DiffusionLMMixin, LLaDAPreTrainedModel):
    """LLaDA with its output head (released architecture name ``LLaDAModelLM``).

    ``forward(input_ids, attention_mask=None)`` returns ``CausalLMOutput`` whose
    ``logits`` (batch, seq, embedding_size) at position i score the token at i (no
    shift). ``hidden_states`` (with ``output_hidden_states=True``): the input of
    every block, then the final state after ``ln_f`` (n_layers + 1 tensors).
    ``use_cache`` / ``past_key_values`` / ``cache_position``: Fast-dLLM's approximate KV cache
    (`kv_cache`); the output then carries ``past_key_values``.
    """

    input_embeddings_path = "model.transformer.wte"
    _supports_approximate_cache = True

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__(config)
        self.model = LLaDAModel(config)
        self.post_init()

    def get_output_embeddings(self) -> nn.Module:
        t = self.model.transformer
        return t.wte if self.config.weight_tying else t.ff_out

    def set_output_embeddings(self, value: nn.Module) -> None:
        raise AttributeError(f"{type(self).__name__} has no lm_head: its head is model.transformer.ff_out, "
                             "or the tied wte")

    def head(self, final: torch.Tensor) -> torch.Tensor:
        return final  # the backbone applies the head itself (the tied wte is read inside it)
