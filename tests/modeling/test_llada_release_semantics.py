"""Whole-model LLaDA check against the released forward's semantics, re-derived here op by op.

The released ``modeling_llada.py`` (GSAI-ML, OLMo-derived) computes, for ``block_type="llama"``:
RoPE tables over positions 0..T-1 in float32 (``positions = cat(freqs, freqs)``), queries and keys rotated in
float32 and cast back (``rope_full_precision``), a padding mask turned into an additive
``(1 - mask) * finfo.min`` bias on the keys, non-causal SDPA with key/value heads repeated by
``repeat_interleave``, RMS norms normalised in float32 and cast back before the gain, the SiLU-gated MLP
``ff_out(silu(ff_proj(h)) * up_proj(h))`` and an untied ``transformer.ff_out`` head over ``embedding_size``.
The reference below follows those steps with plain tensor code; the native model must agree with it on
every real (unpadded) position, in float32 and in bfloat16.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from optimum_fair.modeling import LLaDAConfig, LLaDAModelLM

CFG = dict(
    d_model=64, n_heads=4, n_kv_heads=2, n_layers=3, mlp_hidden_size=96, vocab_size=100, embedding_size=128,
    mask_token_id=99, pad_token_id=98, eos_token_id=98, rope_theta=500000.0, rms_norm_eps=1e-5,
)


def _rms(weight: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    # x: (batch, seq, d); normalise in float32, cast back, then the gain
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rope_tables(seq: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    freqs = torch.einsum("i,j->ij", torch.arange(seq, dtype=torch.float), inv_freq)  # (seq, head_dim/2)
    angles = torch.cat((freqs, freqs), dim=-1)[None, None]  # (1, 1, seq, head_dim)
    return angles.cos(), angles.sin()


def _rotate(u: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # u: (batch, heads, seq, head_dim), rotated in float32 and cast back
    u32 = u.float()
    first, second = u32[..., : u.shape[-1] // 2], u32[..., u.shape[-1] // 2 :]
    return (u32 * cos + torch.cat((-second, first), dim=-1) * sin).to(u.dtype)


def released_forward(model: LLaDAModelLM, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Logits (batch, seq, embedding_size) computed the way the released LLaDA code computes them."""
    c, t = model.config, model.model.transformer
    x = t.wte(ids)  # (batch, seq, d)
    batch, seq, d = x.shape
    heads, kv_heads, head_dim = c.n_heads, c.n_kv_heads, d // c.n_heads
    cos, sin = _rope_tables(seq, head_dim, c.rope_theta)
    bias = (1.0 - mask.float())[:, None, None, :] * torch.finfo(torch.float).min  # (batch, 1, 1, seq)
    bias = bias.to(x.dtype)
    for blk in t.blocks:
        h = _rms(blk.attn_norm.weight, x, c.rms_norm_eps)
        q = blk.q_proj(h).view(batch, seq, heads, head_dim).transpose(1, 2)
        k = blk.k_proj(h).view(batch, seq, kv_heads, head_dim).transpose(1, 2)
        v = blk.v_proj(h).view(batch, seq, kv_heads, head_dim).transpose(1, 2)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=False)
        x = x + blk.attn_out(att.transpose(1, 2).reshape(batch, seq, d))
        h = _rms(blk.ff_norm.weight, x, c.rms_norm_eps)
        x = x + blk.ff_out(F.silu(blk.ff_proj(h)) * blk.up_proj(h))
    return t.ff_out(_rms(t.ln_f.weight, x, c.rms_norm_eps))


def _model() -> LLaDAModelLM:
    torch.manual_seed(0)
    model = LLaDAModelLM(LLaDAConfig(**CFG)).eval()
    with torch.no_grad():  # non-trivial norm gains, larger activations
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


# bfloat16: on this CPU the two agree bit for bit; the bounds leave room for a different SDPA kernel's rounding
# (sparse one-ulp differences) but not for a cast in the wrong place (RoPE applied in bf16, the norm gain applied
# before the cast back, or a wrong rope_theta each move the mean |difference| to about 2e-3).
@pytest.mark.parametrize("dtype,atol,mean_tol", [(torch.float32, 1e-5, 1e-6), (torch.bfloat16, 2e-2, 5e-4)])
def test_native_llada_equals_released_semantics(dtype: torch.dtype, atol: float, mean_tol: float) -> None:
    model = _model().to(dtype)
    ids = torch.randint(0, 100, (3, 11))
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, 8:] = 0  # right padding
    mask[2, :3] = 0  # left padding
    real = mask.bool()
    with torch.no_grad():
        native = model(ids, attention_mask=mask).logits
        ref = released_forward(model, ids, mask)
        unpadded_ref = released_forward(model, ids, torch.ones_like(mask))
    assert native.shape == (3, 11, CFG["embedding_size"]) and native.dtype == dtype
    diff = (native[real].float() - ref[real].float()).abs()
    assert diff.max().item() <= atol, f"max |native - released| = {diff.max().item():.3e} at {dtype}"
    assert diff.mean().item() <= mean_tol, f"mean |native - released| = {diff.mean().item():.3e} at {dtype}"
    # the comparison is sensitive: ignoring the padding moves the padded rows' real positions
    assert (unpadded_ref[1:][real[1:]].float() - ref[1:][real[1:]].float()).abs().max().item() > 10 * atol
