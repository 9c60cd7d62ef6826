"""Weight grids with per-group mins, two-level scales or a codebook, as data: llama.cpp's K-quants, Q4_1 /
Q5_1 and IQ4_NL / IQ4_XS, and the asymmetric grid of `FairCalibConfig(sym=False)`; the search that picks
their scales; llama.cpp's rules for which block linear gets which type in a file type (`MIX_RULES`).

A K-quant cuts each row into super-blocks of 256 weights and those into sub-blocks of `group` weights
(ggml-quants.c). A weight is

    w = s_j * (c + offset) - m_j,    s_j = d * sc_j,    m_j = dmin * mn_j

with c the stored code in [-2^(b-1), 2^(b-1) - 1]; `offset` is 2^(b-1) for the asymmetric types (Q4_K,
Q5_K: the file holds q = c + offset in [0, 2^b - 1] and one min per sub-block) and 0 for Q6_K (signed
codes, no min). d and dmin are fp16 per super-block, sc_j and mn_j small integers (6-bit unsigned for
Q4_K / Q5_K, int8 for Q6_K). A layer stores s_j and m_j per group as float32: they are exact products of
an fp16 and a small integer, so `two_level` recovers (d, sc_j) exactly when the file is written.

Q4_1 / Q5_1 (and `asymmetric_grid`, any group) have no super-block: each group stores its own fp16 scale
and min (`levels` None, `span` = `group`), and the min may be of either sign. IQ4_NL / IQ4_XS codes index
llama.cpp's 16 non-uniform levels (`table`): w = s * table[c + 8], IQ4_XS with 6-bit signed sub-scales.

The search (`choose`) follows llama.cpp's with an importance matrix: per sub-block, candidate inverse
scales around (2^b - 1) / (max - min), each refitted by weighted least squares of (s, m) given its codes,
the least weighted error kept; then the sub-scales are rounded to the super-block's integer levels, the
mins refitted to the rounded scales, and rounded in turn.
Round-off is weighted by an importance per column (diag(H) under GPTQ, what an imatrix holds), or not at
all (plain rounding, the token embedding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .enums import GGUFType
from .ops import searched_scale

__all__ = ["BLOCK_BITS", "FALLBACKS", "GRIDS", "IQ4_LEVELS", "K_GRIDS", "MIX_RULES", "SUPER_BLOCK", "BlockGrid",
           "MixRule", "asymmetric_grid", "choose", "fitted", "level", "linear_type", "nearest", "round_codes",
           "two_level", "use_more_bits", "values"]

SUPER_BLOCK = 256  # QK_K: weights per K-quant super-block
INV_STEPS = tuple(-1.0 + 0.1 * k for k in range(21))  # llama.cpp's Q4_K / Q5_K search: rmin -1, rdelta 0.1, 20 steps


@dataclass(frozen=True)
class BlockGrid:
    """One grid: code bits, weights per scale (`group`), the scales' integer levels per super-block of 256
    (None: each group's scale and min stored as fp16 directly), whether each group has a min (codes stored
    shifted by `offset`), and the GGUF type that holds it (None: none does)."""

    gguf_type: GGUFType | None
    bits: int
    group: int
    levels: tuple[int, int] | None
    asymmetric: bool
    table: tuple[int, ...] | None = None  # a codebook: code c stands for table[c + 2^(b-1)] (IQ4), not c

    @property
    def span(self) -> int:
        """Columns whose scales are chosen together: a super-block, or one group."""
        return SUPER_BLOCK if self.levels else self.group

    @property
    def offset(self) -> int:
        return 2 ** (self.bits - 1) if self.asymmetric else 0

    @property
    def code_range(self) -> tuple[int, int]:
        return -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1


K_GRIDS = {
    GGUFType.Q4_K: BlockGrid(GGUFType.Q4_K, 4, 32, (0, 63), asymmetric=True),
    GGUFType.Q5_K: BlockGrid(GGUFType.Q5_K, 5, 32, (0, 63), asymmetric=True),
    GGUFType.Q6_K: BlockGrid(GGUFType.Q6_K, 6, 16, (-128, 127), asymmetric=False),
}
#: llama.cpp's non-uniform 4-bit levels (kvalues_iq4nl): IQ4_NL and IQ4_XS store indices into them.
IQ4_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)

#: Every grid calibration can round in by GGUF type (the per-32 symmetric types use `ops.searched_scale`).
GRIDS = K_GRIDS | {
    GGUFType.Q4_1: BlockGrid(GGUFType.Q4_1, 4, 32, None, asymmetric=True),
    GGUFType.Q5_1: BlockGrid(GGUFType.Q5_1, 5, 32, None, asymmetric=True),
    GGUFType.IQ4_NL: BlockGrid(GGUFType.IQ4_NL, 4, 32, None, asymmetric=False, table=IQ4_LEVELS),
    GGUFType.IQ4_XS: BlockGrid(GGUFType.IQ4_XS, 4, 32, (-32, 31), asymmetric=False, table=IQ4_LEVELS),
}


def asymmetric_grid(bits: int, group: int) -> BlockGrid:
    """`FairCalibConfig(sym=False)`'s grid: an fp16 scale and min per `group` weights (the GGUF type Q4_1 /
    Q5_1 when that is 32 weights of 4 / 5 bits)."""
    gguf_type = {(4, 32): GGUFType.Q4_1, (5, 32): GGUFType.Q5_1}.get((bits, group))
    return BlockGrid(gguf_type, bits, group, None, asymmetric=True)


#: The per-32 block types calibration rounds in (fp16 scale per block, signed codes): their code bits.
BLOCK_BITS = {GGUFType.Q4_0: 4, GGUFType.Q5_0: 5, GGUFType.Q8_0: 8}

#: What llama.cpp writes instead when a row is not a multiple of 256 weights (llama-quant.cpp).
FALLBACKS = {GGUFType.Q4_K: GGUFType.Q5_0, GGUFType.Q5_K: GGUFType.Q5_1, GGUFType.Q6_K: GGUFType.Q8_0,
             GGUFType.IQ4_XS: GGUFType.IQ4_NL}


@dataclass(frozen=True)
class MixRule:
    """Which type llama-quantize gives the block linears of one file type (llama_tensor_get_type for a
    dense LLaMA-like model): `base`, except the value projection and the MLP down projection of the
    layers `use_more_bits` picks, which get `more_bits` (None: no exception)."""

    base: GGUFType
    more_bits: GGUFType | None = None

    @property
    def types(self) -> tuple[GGUFType, ...]:
        return (self.base,) if self.more_bits is None else (self.base, self.more_bits)


MIX_RULES = {
    GGUFType.Q4_0: MixRule(GGUFType.Q4_0),
    GGUFType.Q8_0: MixRule(GGUFType.Q8_0),
    GGUFType.Q4_K_M: MixRule(GGUFType.Q4_K, more_bits=GGUFType.Q6_K),
    GGUFType.Q5_K_M: MixRule(GGUFType.Q5_K, more_bits=GGUFType.Q6_K),
    GGUFType.Q6_K: MixRule(GGUFType.Q6_K),
    GGUFType.IQ4_NL: MixRule(GGUFType.IQ4_NL),
    GGUFType.IQ4_XS: MixRule(GGUFType.IQ4_XS),
}


def use_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's layers that get more bits in the _M mixes: the first and last eighth, every third between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def linear_type(mix: GGUFType, role: str | None, layer: int, n_layers: int, in_features: int) -> GGUFType:
    """The GGUF type of one block linear under file type `mix`: role "attn_v" / "ffn_down" (or None),
    its block index of n_layers, and its input width (a K-quant falls back when 256 does not divide it)."""
    rule = MIX_RULES[mix]
    qtype = rule.more_bits if rule.more_bits and role in ("attn_v", "ffn_down") and use_more_bits(layer, n_layers) \
        else rule.base
    return fitted(qtype, in_features)


def fitted(qtype: GGUFType, width: int) -> GGUFType:
    """`qtype` for rows of `width` weights: a super-block type (a key of FALLBACKS) falls back as llama.cpp's
    does when 256 does not divide the width."""
    return FALLBACKS.get(qtype, qtype) if width % SUPER_BLOCK else qtype


def choose(grid: BlockGrid, w: torch.Tensor, importance: torch.Tensor | None = None
           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales s (R, K / group) and mins m (R, K / group) (None on a symmetric grid) of w (R, K), K a multiple
    of the grid's span, as they are stored (fp16, or exact float32 products d * sc, dmin * mn); importance
    (K,) or None."""
    r, k = w.shape
    if k % grid.span:
        raise ValueError(f"{_name(grid)} needs rows of a multiple of {grid.span} weights, got {k}")
    x, n_sub = w.float(), grid.span // grid.group
    a = _weights(x, importance)  # (R, K)
    if grid.table:
        sub = _table_scales(x.reshape(r, -1, grid.group), a.reshape(r, -1, grid.group), grid.table)
        return _on_levels(sub, grid.levels, n_sub, signed=True), None  # sub: (R, K / group)
    if not grid.asymmetric:  # a per-column importance: one search over all rows
        sub = searched_scale(x, grid.bits, grid.group, None if importance is None else a[0])  # (R, K / group)
        return _on_levels(sub, grid.levels, n_sub, signed=True), None
    xg, ag = x.reshape(r, -1, grid.group), a.reshape(r, -1, grid.group)  # (R, G, g)
    s, m = _fit_sub_blocks(xg, ag, 2 ** grid.bits - 1, clip_min=grid.levels is not None)
    s = _on_levels(s, grid.levels, n_sub)
    m = _refit_mins(xg, ag, s, m, 2 ** grid.bits - 1, clip_min=grid.levels is not None)
    return s, _on_levels(m, grid.levels, n_sub)


def _name(grid: BlockGrid) -> str:
    return grid.gguf_type.value if grid.gguf_type else f"the {grid.bits}-bit asymmetric grid"


def _weights(x: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
    """(R, K): each weight's share of the loss, importance (K,) per column (diag(H): GPTQ's loss is
    sum_j H_jj e_j^2 to first order), or ones (plain squared error; this beat llama.cpp's own weighting
    by |x| on the shipped model's tensors)."""
    if importance is None:
        return torch.ones_like(x)
    return importance.float().clamp(min=0).unsqueeze(0).expand_as(x)


def _fit_sub_blocks(x: torch.Tensor, a: torch.Tensor, nmax: int, clip_min: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sub-block of x (R, G, g), weights a, the scale s >= 0 and min m (w ~ s q - m, q in [0, nmax])
    with the least weighted error among llama.cpp's candidates, each refitted by least squares; clip_min:
    m >= 0 (the K-quants' unsigned mins: the offset -m never above 0)."""
    lo = x.amin(-1, keepdim=True)  # (R, G, 1)
    lo = lo.clamp(max=0) if clip_min else lo
    width = (x.amax(-1, keepdim=True) - lo).clamp(min=1e-30)  # (R, G, 1)
    inv = (nmax + torch.tensor(INV_STEPS, device=x.device)) / width  # (R, G, C)
    q = torch.round((x.unsqueeze(-1) - lo.unsqueeze(-1)) * inv.unsqueeze(-2)).clamp(0, nmax)  # (R, G, g, C)
    q = torch.cat([q, torch.round((x - lo) * nmax / width).clamp(0, nmax).unsqueeze(-1)], -1)  # + the plain one
    aw = a.unsqueeze(-1)  # (R, G, g, 1)
    sa, sq, sqq = aw.sum(-2), (aw * q).sum(-2), (aw * q * q).sum(-2)  # (R, G, C)
    sx, sqx = (aw * x.unsqueeze(-1)).sum(-2), (aw * q * x.unsqueeze(-1)).sum(-2)
    det = (sa * sqq - sq * sq).clamp(min=1e-30)
    s = (sa * sqx - sq * sx) / det  # (R, G, C): least squares of x ~ s q + b
    b = (sqq * sx - sq * sqx) / det
    above = b > 0 if clip_min else torch.zeros_like(b, dtype=torch.bool)  # clip_min: refit with b = 0
    s = torch.where(above, sqx / sqq.clamp(min=1e-30), s).clamp(min=0)
    b = torch.where(above, torch.zeros_like(b), b)
    err = (aw * (s.unsqueeze(-2) * q + b.unsqueeze(-2) - x.unsqueeze(-1)) ** 2).sum(-2)  # (R, G, C)
    best = err.argmin(-1, keepdim=True)
    return s.gather(-1, best).squeeze(-1), -b.gather(-1, best).squeeze(-1)


def _table_scales(x: torch.Tensor, a: torch.Tensor, table: tuple[int, ...]) -> torch.Tensor:
    """Per group of x (R, G, g), weights a, the scale of least weighted error on a codebook grid, as llama.cpp's
    IQ4 search: the signed extreme mapped to table[0] + k (k = -7..7) or to -table[0], each refitted by least
    squares on the indices it gives; (R, G). The extreme is also mapped to each level as it is, so a group
    already on the grid finds its own scale (what makes rounding twice change nothing)."""
    t = torch.tensor(table, dtype=torch.float32, device=x.device)
    ref = x.gather(-1, x.abs().argmax(-1, keepdim=True))  # (R, G, 1)
    targets = torch.cat([t[0] + torch.arange(-7, 8, device=x.device), -t[:1], t])  # (C,): + each level itself
    cand = (ref / targets).unsqueeze(-2)  # (R, G, 1, C)
    safe = torch.where(cand == 0, torch.ones_like(cand), cand)
    q = t[torch.bucketize(x.unsqueeze(-1) / safe, (t[1:] + t[:-1]) / 2)]  # (R, G, g, C): nearest levels
    aw = a.unsqueeze(-1)
    sqx, sqq = (aw * q * x.unsqueeze(-1)).sum(-2), (aw * q * q).sum(-2)  # (R, G, C)
    score = sqx * sqx / sqq.clamp(min=1e-30)  # the error each refit removes: the largest wins
    best = score.argmax(-1, keepdim=True)
    return (sqx / sqq.clamp(min=1e-30)).gather(-1, best).squeeze(-1)


def _refit_mins(x: torch.Tensor, a: torch.Tensor, s: torch.Tensor, m: torch.Tensor, nmax: int, clip_min: bool,
                iters: int = 3) -> torch.Tensor:
    """The mins (R, G) refitted for the stored scales s (R, G): alternately the codes of x (R, G, g) and the
    weighted mean offset sum a (s q - x) / sum a (what rounding the scales moved; -1.7 % squared error on the
    shipped model's Q4_K embedding)."""
    step, m = s.unsqueeze(-1), m.unsqueeze(-1)  # (R, G, 1)
    safe = torch.where(step == 0, torch.ones_like(step), step)
    for _ in range(iters):
        q = torch.where(step == 0, torch.zeros_like(x), torch.round((x + m) / safe)).clamp(0, nmax)
        m = (a * (step * q - x)).sum(-1, keepdim=True) / a.sum(-1, keepdim=True).clamp(min=1e-30)
        m = m.clamp(min=0) if clip_min else m
    return m.squeeze(-1)


def _on_levels(sub: torch.Tensor, levels: tuple[int, int] | None, n_sub: int, signed: bool = False
               ) -> torch.Tensor:
    """sub (R, K / group) rounded to d * l per super-block of n_sub sub-scales (d fp16, l in `levels`), float32.

    Unsigned levels: the largest sub-scale maps to the top level. Signed: the sub-scale of largest
    magnitude maps to the bottom level (-128), whatever its sign, as llama.cpp's Q6_K does. No levels: fp16."""
    if levels is None:
        return sub.half().float()
    r, n = sub.shape
    per = sub.reshape(r, n // n_sub, n_sub)  # (R, S, n_sub)
    if signed:
        ref = per.gather(-1, per.abs().argmax(-1, keepdim=True))  # (R, S, 1): the signed extreme
        d = (ref / levels[0]).half().float()
    else:
        d = (per.amax(-1, keepdim=True) / levels[1]).half().float()
    safe = torch.where(d == 0, torch.ones_like(d), d)
    lv = torch.round(per / safe).clamp(*levels)  # d == 0 (all zeros, or below fp16): d * lv is 0
    return (d * lv).reshape(r, n)


def nearest(grid: BlockGrid, w: torch.Tensor, s: torch.Tensor, m: torch.Tensor | float = 0.0) -> torch.Tensor:
    """The code (float, in the grid's code range) nearest to each w, for scale s and min m (broadcast)."""
    safe = torch.where(s == 0, torch.ones_like(s), s)
    y = (w.float() + m) / safe
    if grid.table:
        t = torch.tensor(grid.table, dtype=torch.float32, device=w.device)
        return (torch.bucketize(y, (t[1:] + t[:-1]) / 2) - 2 ** (grid.bits - 1)).float()
    return (torch.round(y) - grid.offset).clamp(*grid.code_range)


def level(grid: BlockGrid, codes: torch.Tensor) -> torch.Tensor:
    """What a code stands for, float32: c + offset, or the codebook's value."""
    if grid.table:
        t = torch.tensor(grid.table, dtype=torch.float32, device=codes.device)
        return t[codes.long() + 2 ** (grid.bits - 1)]
    return codes.float() + grid.offset


def round_codes(grid: BlockGrid, w: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor | None) -> torch.Tensor:
    """Codes c (R, K) int8 in the grid's code range of w (R, K) on per-group scale / mins (R, K / group)."""
    s = scale.float().repeat_interleave(grid.group, dim=1)  # (R, K)
    m = 0.0 if mins is None else mins.float().repeat_interleave(grid.group, dim=1)
    return nearest(grid, w, s, m).to(torch.int8)


def values(grid: BlockGrid, codes: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor | None) -> torch.Tensor:
    """s * level(c) - m, float32 (R, K): what llama.cpp's dequantizer computes from the file."""
    w = scale.float().repeat_interleave(grid.group, dim=1) * level(grid, codes)
    return w if mins is None else w - mins.float().repeat_interleave(grid.group, dim=1)


def two_level(sub: torch.Tensor, levels: tuple[int, int], n_sub: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(d, l): sub (R, n) = d * l exactly, d (R, n / n_sub) float16 per super-block, l (R, n) int16 in
    `levels`. Found by trying every level for the sub-scale of largest magnitude; ValueError if sub is not
    on such a grid (scales not calibrated for this type)."""
    r, n = sub.shape
    per = sub.float().reshape(r, n // n_sub, n_sub)  # (R, S, n_sub)
    ref = per.gather(-1, per.abs().argmax(-1, keepdim=True))  # (R, S, 1)
    d = torch.zeros_like(ref)
    found = ref == 0  # an all-zero super-block: d = 0, every level 0
    for level in range(levels[0], levels[1] + 1):
        if level == 0:
            continue
        cand = (ref / level).half().float()  # (R, S, 1)
        lv = per / torch.where(cand == 0, torch.ones_like(cand), cand)
        ok = ~found & (cand * level == ref) & (lv == torch.round(lv)).all(-1, keepdim=True) \
            & (lv >= levels[0]).all(-1, keepdim=True) & (lv <= levels[1]).all(-1, keepdim=True)
        d, found = torch.where(ok, cand, d), found | ok
    if not bool(found.all()):
        raise ValueError(f"scales are not fp16 x integers in {list(levels)} per super-block of {n_sub}: the layer was "
                         "not calibrated for this K-quant type")
    safe = torch.where(d == 0, torch.ones_like(d), d)
    return d.half().reshape(r, -1), torch.round(per / safe).to(torch.int16).reshape(r, n)
