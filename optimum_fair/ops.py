"""Low-bit primitives, pure torch: symmetric (de)quantization, int4 packing, activation fake-quant.

Conventions
    * Signed symmetric grid with `bits` bits: codes in [-2^(b-1), 2^(b-1) - 1], value = code * scale.
    * Weights (out, in) get one scale per output row, or per `group_size` consecutive inputs; it maps
      the largest magnitude of the row (or group) to `grid_top`: 2^(b-1) - 1/2 on the full grid (the
      default since format version 2; 7.5 for int4, as compressed-tensors), so -max|w| lands on the code
      -2^(b-1) and +max|w| rounds to 2^(b-1) - 1 (error scale / 2); or 2^(b-1) - 1 on the symmetric grid
      of version 1 (codes in [-7, 7] for int4). Either way the round-off of any value inside the
      clipping range is at most scale / 2.
    * Activations (..., d) get one scale per token (per row of the last dimension), mapping its largest
      magnitude to 2^(b-1) - 1.
"""

from __future__ import annotations

import torch

from .enums import WeightGrid

__all__ = [
    "act_scale",
    "dequantize_weight",
    "fake_quant_act",
    "fake_quant_weight",
    "grid_top",
    "kron_apply",
    "pack_int4",
    "qmax",
    "quantize_act",
    "quantize_weight",
    "round_ste",
    "scale_candidates",
    "searched_scale",
    "unpack_int4",
    "weight_scale",
]


def qmax(bits: int) -> int:
    """Largest positive code of a signed `bits`-bit grid (7 for int4, 127 for int8)."""
    if bits < 2 or bits > 16:
        raise ValueError(f"bits must be in [2, 16], got {bits}")
    return 2 ** (bits - 1) - 1


def grid_top(bits: int, grid: WeightGrid = WeightGrid.FULL) -> float:
    """What a weight row's max|w| maps to: 7.5 (full) or 7 (symmetric) for int4, 127.5 or 127 for int8.

    The searched grid has no fixed map; where one is needed (fake quantization while transforms are
    trained) it uses the full grid's."""
    return qmax(bits) + (0.0 if WeightGrid(grid) is WeightGrid.SYMMETRIC else 0.5)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round with a straight-through gradient (identity in backward)."""
    return x + (torch.round(x) - x).detach()


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    # w: (out, in) -> (out, n_groups, g)
    out_f, in_f = w.shape
    g = in_f if group_size == -1 else group_size
    if g <= 0 or in_f % g:
        raise ValueError(f"group_size {group_size} must be -1 or a positive divisor of in_features {in_f}")
    return w.reshape(out_f, in_f // g, g)


def weight_scale(w: torch.Tensor, bits: int, group_size: int = -1, clip: torch.Tensor | float = 1.0,
                 grid: WeightGrid = WeightGrid.FULL, importance: torch.Tensor | None = None,
                 scale_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-row (or per-group) scale: clip * max|w| / grid_top.  Returns (out, n_groups) float32.

    On the searched grid: `searched_scale(w, bits, group_size, importance, clip, scale_dtype)`."""
    # w: (out, in); clip: scalar or broadcastable to (out, n_groups)
    if WeightGrid(grid) is WeightGrid.SEARCH:
        return searched_scale(w, bits, group_size, importance, clip, scale_dtype)
    amax = _grouped(w.float(), group_size).abs().amax(dim=-1)  # (out, n_groups)
    scale = amax * clip / grid_top(bits, grid)
    return scale.clamp(min=torch.finfo(torch.float32).tiny * 1e3)


#: llama.cpp's candidates (make_qx_quants): the signed extreme of a group mapped to -(2^(b-1) + k / 10)
SEARCH_STEPS = tuple(k / 10 for k in range(-9, 10))


def searched_scale(w: torch.Tensor, bits: int, group_size: int = -1, importance: torch.Tensor | None = None,
                   clip: torch.Tensor | float = 1.0, scale_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-group scale (out, n_groups) float32 with the least importance-weighted round-off among candidates.

    The round-off of a group with scale s is E(s) = sum_j a_j (w_j - s q_j)^2 with q_j = clamp(round(w_j / s)),
    a = `importance` (in,) (the Hessian diagonal under GPTQ: an imatrix; None: all ones), over the
    candidates of `scale_candidates`. The result is stored exactly in `scale_dtype`, and its error is at most
    that of llama.cpp's reference choices (Q4_0: m / -8, Q8_0: max|w| / 127) and of the full grid's scale.
    A group of zeros gets the smallest normal `scale_dtype` value.
    """
    wg = _grouped(w.float(), group_size)  # (out, G, g)
    out_f, n_groups, g = wg.shape
    a = _importance(importance, n_groups, g, w.device)  # (G, g)
    scale = torch.empty(out_f, n_groups, device=w.device)
    rows = max(1, 2**22 // (n_groups * g * (2 * len(SEARCH_STEPS) + 2)))  # bound the (R, G, g, C) temporaries
    for r in range(0, out_f, rows):
        x = wg[r:r + rows]  # (R, G, g)
        cand = _candidates(x, a, bits, _clip_rows(clip, out_f, n_groups, w.device, r, rows), scale_dtype)
        q = torch.round(x.unsqueeze(-1) / cand.unsqueeze(-2)).clamp_(-qmax(bits) - 1, qmax(bits))  # (R, G, g, C)
        err = (a.unsqueeze(-1) * (x.unsqueeze(-1) - q * cand.unsqueeze(-2)) ** 2).sum(-2)  # (R, G, C)
        scale[r:r + rows] = cand.gather(-1, err.argmin(-1, keepdim=True)).squeeze(-1)
    return scale


def scale_candidates(w: torch.Tensor, bits: int, importance: torch.Tensor | None = None,
                     clip: torch.Tensor | float = 1.0, scale_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The candidate scales (out, C) of one group of columns w (out, g), as `searched_scale` weighs them.

    As llama.cpp searches them: s = m / -(2^(b-1) + k/10) for the signed extreme m (clip * the value of
    largest magnitude) and k in `SEARCH_STEPS`; for each, the weighted least-squares scale of its codes
    sum a w q / sum a q^2; the full grid's clip * max|w| / (2^(b-1) - 1/2); and the symmetric one's
    clip * max|w| / (2^(b-1) - 1) (llama.cpp's Q8_0 reference). Each is rounded to
    `scale_dtype` (what is stored); zeros become the smallest normal value of that dtype.
    """
    x = w.float().unsqueeze(1)  # (out, 1, g)
    a = _importance(importance, 1, w.shape[1], w.device)  # (1, g)
    return _candidates(x, a, bits, _clip_rows(clip, w.shape[0], 1, w.device, 0, w.shape[0]), scale_dtype)[:, 0]


def _candidates(x: torch.Tensor, a: torch.Tensor, bits: int, clip: torch.Tensor,
                scale_dtype: torch.dtype) -> torch.Tensor:
    """Candidate scales (R, G, C) of groups x (R, G, g) with importance a (G, g); see `scale_candidates`."""
    lo, hi = -qmax(bits) - 1, qmax(bits)
    steps = -(hi + 1 + torch.tensor(SEARCH_STEPS, device=x.device))  # (K,)
    tiny = torch.finfo(scale_dtype).tiny
    m = x.gather(-1, x.abs().argmax(-1, keepdim=True)) * clip  # (R, G, 1): signed extreme
    base = m / steps  # (R, G, K)
    q = torch.round(x.unsqueeze(-1) / base.unsqueeze(-2)).clamp_(lo, hi)  # (R, G, g, K)
    aq = a.unsqueeze(-1) * q  # (R, G, g, K)
    num, den = (aq * x.unsqueeze(-1)).sum(-2), (aq * q).sum(-2)  # (R, G, K)
    fitted = torch.where(den > 0, num / den.clamp(min=tiny), base)
    amax = x.abs().amax(-1, keepdim=True) * clip  # (R, G, 1)
    cand = torch.cat((base, fitted, amax / (hi + 0.5), amax / hi), -1).to(scale_dtype).float()  # (R, G, C)
    return torch.where(cand == 0, torch.full_like(cand, tiny), cand)


def _importance(importance: torch.Tensor | None, n_groups: int, g: int, device) -> torch.Tensor:
    """Per-column importance as (G, g); all ones for None."""
    if importance is None:
        return torch.ones(n_groups, g, device=device)
    return importance.float().reshape(n_groups, g)


def _clip_rows(clip: torch.Tensor | float, out_f: int, n_groups: int, device, r: int, rows: int) -> torch.Tensor:
    """Rows r .. r + rows of a clip ratio (scalar, (out, 1) or (out, G)) as (R, G, 1), or a 0-d tensor."""
    c = torch.as_tensor(clip, dtype=torch.float32, device=device)
    return c.expand(out_f, n_groups)[r:r + rows].unsqueeze(-1) if c.dim() else c


def quantize_weight(w: torch.Tensor, scale: torch.Tensor, bits: int, group_size: int = -1) -> torch.Tensor:
    """Integer codes of `w` on the grid given by `scale`.  Returns int8 (out, in)."""
    # w: (out, in); scale: (out, n_groups)
    wg = _grouped(w.float(), group_size)  # (out, n_groups, g)
    q = torch.round(wg / scale.float().unsqueeze(-1)).clamp(-qmax(bits) - 1, qmax(bits))
    return q.reshape(w.shape).to(torch.int8)


def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor, group_size: int = -1) -> torch.Tensor:
    """codes * scale, float32 (out, in)."""
    # codes: (out, in) int8; scale: (out, n_groups)
    cg = _grouped(codes.float(), group_size)
    return (cg * scale.float().unsqueeze(-1)).reshape(codes.shape)


def fake_quant_weight(
    w: torch.Tensor, bits: int, group_size: int = -1, clip: torch.Tensor | float = 1.0,
    grid: WeightGrid = WeightGrid.FULL,
) -> torch.Tensor:
    """Quantize-dequantize `w` (differentiable through the rounding by straight-through)."""
    # w: (out, in) -> (out, in), same dtype
    wg = _grouped(w, group_size)  # (out, n_groups, g)
    amax = wg.abs().amax(dim=-1, keepdim=True)
    scale = (amax * (clip.unsqueeze(-1) if torch.is_tensor(clip) and clip.dim() else clip) / grid_top(bits, grid))
    scale = scale.clamp(min=1e-8)
    q = round_ste(wg / scale).clamp(-qmax(bits) - 1, qmax(bits))
    return (q * scale).reshape(w.shape).to(w.dtype)


def fake_quant_act(x: torch.Tensor, bits: int, clip: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Per-token symmetric quantize-dequantize of activations; identity for bits >= 16.

    x: (..., d). The scale of each token is clip * max_j |x_j| / qmax. Gradients pass straight through
    the rounding and reach `clip` (learnable clipping).
    """
    if bits >= 16:
        return x
    if not torch.is_grad_enabled() or not (x.requires_grad or (torch.is_tensor(clip) and clip.requires_grad)):
        # inference: the same values (x + (round(x) - x) == round(x) exactly), half the passes
        codes, scale = quantize_act(x, bits, clip)
        return (codes.float() * scale).to(x.dtype)
    scale = act_scale(x, bits, clip)
    q = round_ste(x.float() / scale).clamp(-qmax(bits) - 1, qmax(bits))
    return (q * scale).to(x.dtype)


def act_scale(x: torch.Tensor, bits: int, clip: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Per-token scale clip * max_j |x_j| / qmax, float32: x (..., d) -> (..., 1)."""
    amax = x.detach().abs().amax(dim=-1, keepdim=True).float()  # (..., 1)
    return (amax * clip / qmax(bits)).clamp(min=1e-8)


def quantize_act(x: torch.Tensor, bits: int, clip: torch.Tensor | float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric activation codes, the integer half of `fake_quant_act`.

    x: (..., d) -> codes (..., d) int8 in [-qmax - 1, qmax] and scale (..., 1) float32, with
    fake_quant_act(x) == (codes * scale).to(x.dtype). Needs bits <= 8.
    """
    if bits > 8:
        raise ValueError(f"activation codes live in int8: bits must be <= 8, got {bits}")
    scale = act_scale(x, bits, clip)
    codes = (x.float() / scale).round_().clamp_(-qmax(bits) - 1, qmax(bits))
    return codes.to(torch.int8), scale


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Two signed 4-bit codes per byte: element 2k in the low nibble, 2k+1 in the high nibble.

    codes: (..., n) integers in [-8, 7] -> (..., ceil(n / 2)) uint8. An odd last dimension is padded
    with a zero code; `unpack_int4` needs n to drop it.
    """
    if codes.numel() and (codes.min() < -8 or codes.max() > 7):
        raise ValueError("pack_int4 needs codes in [-8, 7]")
    nib = (codes.to(torch.int16) & 0xF).to(torch.uint8)  # two's complement nibbles
    if nib.shape[-1] % 2:
        nib = torch.nn.functional.pad(nib, (0, 1))
    lo, hi = nib[..., 0::2], nib[..., 1::2]
    return lo | (hi << 4)


def unpack_int4(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of `pack_int4`: (..., ceil(n / 2)) uint8 -> (..., n) int8 codes in [-8, 7]."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_int4 needs uint8, got {packed.dtype}")
    if packed.shape[-1] != (n + 1) // 2:
        raise ValueError(f"packed last dim {packed.shape[-1]} does not hold {n} codes")
    signed = packed.view(torch.int8)  # arithmetic shifts sign-extend each two's complement nibble
    lo, hi = (signed << 4) >> 4, signed >> 4
    return torch.stack((lo, hi), dim=-1).flatten(-2)[..., :n]  # (..., n) in [-8, 7]


def kron_apply(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x @ (a kron b) without forming the Kronecker product.

    x: (..., n1 * n2); a: (n1, n1); b: (n2, n2). Row-major flattening: index i * n2 + j.
    """
    n1, n2 = a.shape[0], b.shape[0]
    xs = x.reshape(*x.shape[:-1], n1, n2)  # (..., n1, n2)
    out = a.to(x.dtype).t() @ xs @ b.to(x.dtype)  # (..., n1, n2)
    return out.reshape(x.shape)
