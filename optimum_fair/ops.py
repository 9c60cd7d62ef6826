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
    "unpack_int4",
    "weight_scale",
]


def qmax(bits: int) -> int:
    """Largest positive code of a signed `bits`-bit grid (7 for int4, 127 for int8)."""
    if bits < 2 or bits > 16:
        raise ValueError(f"bits must be in [2, 16], got {bits}")
    return 2 ** (bits - 1) - 1


def grid_top(bits: int, grid: WeightGrid = WeightGrid.FULL) -> float:
    """What a weight row's max|w| maps to: 7.5 (full) or 7 (symmetric) for int4, 127.5 or 127 for int8."""
    return qmax(bits) + (0.5 if WeightGrid(grid) is WeightGrid.FULL else 0.0)


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
                 grid: WeightGrid = WeightGrid.FULL) -> torch.Tensor:
    """Per-row (or per-group) scale: clip * max|w| / grid_top.  Returns (out, n_groups) float32."""
    # w: (out, in); clip: scalar or broadcastable to (out, n_groups)
    amax = _grouped(w.float(), group_size).abs().amax(dim=-1)  # (out, n_groups)
    scale = amax * clip / grid_top(bits, grid)
    return scale.clamp(min=torch.finfo(torch.float32).tiny * 1e3)


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
