"""Building blocks shared by the native LLaDA, LLaDA-MoE, LLaDA2 and Dream models.

Pure tensor code: RMS normalisation, rotate-half rotary embeddings, the
padding-mask conversion and bidirectional (non-causal) scaled dot-product
attention with grouped-query heads. Nothing here knows parameter names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

__all__ = [
    "RMSNorm",
    "apply_partial_rotary",
    "apply_rotary",
    "bidirectional_attention",
    "default_position_ids",
    "init_dense_weights",
    "prepare_attention_mask",
    "resolve_position_ids",
    "rotary_cos_sin",
    "run_layers",
]


class RMSNorm(nn.Module):
    """Root-mean-square normalisation with a learned per-channel gain.

    The statistic is computed in float32 and the normalised activations are cast
    back to the input dtype before the gain is applied (as in LLaDA and Qwen2).
    """

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., hidden)
        x32 = x.to(torch.float32)
        variance = x32.pow(2).mean(-1, keepdim=True)  # (..., 1)
        normed = (x32 * torch.rsqrt(variance + self.eps)).to(x.dtype)
        return self.weight * normed

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def default_position_ids(batch: int, seq_len: int, device: torch.device) -> torch.Tensor:
    """Positions 0..seq_len-1 for every row: (batch, seq_len) int64."""
    return torch.arange(seq_len, device=device).unsqueeze(0).expand(batch, seq_len)


def resolve_position_ids(
    position_ids: torch.Tensor | None, batch: int, seq_len: int, device: torch.device
) -> torch.Tensor:
    """Default, broadcast and check ``position_ids``: None, (seq,) or (batch, seq) -> (batch, seq)."""
    if position_ids is None:
        return default_position_ids(batch, seq_len, device)
    if position_ids.dim() == 1:
        position_ids = position_ids.unsqueeze(0)
    if position_ids.dim() != 2 or position_ids.shape[1] != seq_len or position_ids.shape[0] not in (1, batch):
        raise ValueError(
            f"position_ids: expected shape ({seq_len},) or ({batch}, {seq_len}), got {tuple(position_ids.shape)}"
        )
    return position_ids.expand(batch, seq_len)


def rotary_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half RoPE tables computed on the fly (no buffers, so nothing can go stale).

    Args:
        position_ids: (batch, seq) integer positions.
        head_dim: even per-head dimension.
        theta: RoPE base.

    Returns:
        cos, sin: (batch, seq, head_dim) float32.
    """
    if head_dim % 2 != 0:
        raise ValueError(f"head_dim must be even for rotary embeddings, got {head_dim}")
    exponent = torch.arange(0, head_dim, 2, dtype=torch.float32, device=position_ids.device) / head_dim
    inv_freq = 1.0 / (theta**exponent)  # (head_dim/2,)
    freqs = position_ids.to(torch.float32)[..., None] * inv_freq  # (batch, seq, head_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (batch, seq, head_dim)
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    # x: (..., head_dim) -> (-x2, x1)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, full_precision: bool
) -> torch.Tensor:
    """Rotate queries or keys.

    Args:
        x: (batch, heads, seq, head_dim).
        cos, sin: (batch, seq, head_dim).
        full_precision: rotate in float32 and cast back (LLaDA); otherwise cast the
            tables to ``x.dtype`` first (Qwen2 / Dream).
    """
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (batch, 1, seq, head_dim)
    if full_precision:
        x32 = x.to(torch.float32)
        return (x32 * cos + _rotate_half(x32) * sin).to(x.dtype)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + _rotate_half(x) * sin


def apply_partial_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] channels of x (batch, heads, seq, head_dim), tables cast to x's
    dtype (LLaDA-MoE, LLaDA2); the other channels pass unchanged."""
    rd = cos.shape[-1]
    if rd == x.shape[-1]:
        return apply_rotary(x, cos, sin, full_precision=False)
    return torch.cat((apply_rotary(x[..., :rd], cos, sin, full_precision=False), x[..., rd:]), dim=-1)


def prepare_attention_mask(
    attention_mask: torch.Tensor | None, batch: int, seq_len: int, kv_len: int | None = None
) -> torch.Tensor | None:
    """Turn a user mask into an SDPA ``attn_mask`` for bidirectional attention.

    Accepts ``None``; a padding mask (batch, keys) of 1 (real) / 0 (pad), which hides
    padded *keys* from every query; or an already prepared 4-D mask
    (batch or 1, heads or 1, seq or 1, keys), boolean (True = attend) or additive
    float, which is passed through (so a prepared mask can be handed on to blocks). An all-ones padding
    mask becomes ``None``. ``kv_len``: the number of keys (default ``seq_len``; more with a KV cache,
    where the queries are a window of the cached sequence).
    """
    if attention_mask is None:
        return None
    keys = seq_len if kv_len is None else kv_len
    if attention_mask.dim() == 4:
        rows, cols = attention_mask.shape[-2:]
        if cols != keys or rows not in (1, seq_len) or attention_mask.shape[0] not in (1, batch):
            raise ValueError(
                f"attention_mask: expected 4-D shape (batch, heads, {seq_len} or 1, {keys}), "
                f"got {tuple(attention_mask.shape)}"
            )
        return attention_mask
    if attention_mask.dim() != 2 or attention_mask.shape != (batch, keys):
        raise ValueError(
            f"attention_mask: expected a (batch, seq) = ({batch}, {keys}) padding mask of 1/0 "
            f"or a 4-D mask, got shape {tuple(attention_mask.shape)}"
        )
    keep = attention_mask.bool()  # (batch, keys)
    if bool(keep.all()):
        return None
    return keep[:, None, None, :]  # (batch, 1, 1, keys): key padding, broadcast over queries


def bidirectional_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None, dropout_p: float = 0.0
) -> torch.Tensor:
    """Non-causal softmax attention with grouped-query heads.

    Args:
        q: (batch, heads, seq, head_dim); k, v: (batch, kv_heads, seq, head_dim),
            heads a multiple of kv_heads.
        attn_mask: output of :func:`prepare_attention_mask` or ``None``.

    Returns:
        (batch, seq, heads * head_dim)
    """
    n_heads, n_kv = q.shape[1], k.shape[1]
    if n_heads % n_kv != 0:
        raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv})")
    if n_kv != n_heads:
        k = k.repeat_interleave(n_heads // n_kv, dim=1)  # (batch, heads, seq, head_dim)
        v = v.repeat_interleave(n_heads // n_kv, dim=1)
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        attn_mask = attn_mask.to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=False)
    batch, _, seq, head_dim = out.shape
    return out.transpose(1, 2).reshape(batch, seq, n_heads * head_dim)


def run_layers(layers: nn.ModuleList, norm: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None,
               rope: tuple[torch.Tensor, torch.Tensor], output_hidden_states: bool, **cache: object
               ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """x (batch, seq, hidden) through every layer, then `norm`; with output_hidden_states also the input
    of every layer and the final normalised state (len(layers) + 1 tensors). ``cache``: ``past_key_values``
    and ``cache_position`` for layers that take them (`kv_cache`), passed only when given."""
    states: list[torch.Tensor] = []
    cache = {k: v for k, v in cache.items() if v is not None}
    for layer in layers:
        if output_hidden_states:
            states.append(x)  # input of each layer
        x = layer(x, attention_mask=attn_mask, position_embeddings=rope, **cache)
    x = norm(x)
    if output_hidden_states:
        states.append(x)  # final, after norm
    return x, (tuple(states) if output_hidden_states else None)


@torch.no_grad()
def init_dense_weights(module: nn.Module, std: float) -> None:
    """Normal(0, std) linear and embedding weights, zero biases and padding row, unit RMSNorm gains."""
    if isinstance(module, nn.Linear):
        init.normal_(module.weight, mean=0.0, std=std)
        if module.bias is not None:
            init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        init.normal_(module.weight, mean=0.0, std=std)
        if module.padding_idx is not None:
            init.zeros_(module.weight[module.padding_idx])
    elif isinstance(module, RMSNorm):
        init.ones_(module.weight)
