"""Token-weighted GPTQ (Frantar et al., 2022) on a symmetric grid.

Pure functions:
    * `accumulate_hessian(x, w, H, n_seen)`: running mean H = (1/n) Σ_i w_i x_i x_iᵀ over calibration
      tokens, with FAIR-Calib's per-position weights w_i (w ≡ 1 gives plain GPTQ up to GPTQ's factor 2,
      which does not change the result).
    * `hessian_sum(x, w)`: one batch's Σ_i w_i x_i x_iᵀ (float64) and token count, for callers that add
      batches in a fixed order themselves (several processes give the bits of one).
    * `gptq_quantize(W, H, bits, ...)`: codes and scales that minimise tr((W − Ŵ) H (W − Ŵ)ᵀ) column by
      column, spreading each column's rounding error over the columns not yet quantized.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..enums import WeightGrid
from ..grids import SUPER_BLOCK, BlockGrid, choose, level, nearest
from ..ops import qmax, scale_candidates, weight_scale
from .objective import expand_token_weights

__all__ = ["GPTQFactor", "accumulate_hessian", "drift_sum", "drift_target", "gptq_factor", "gptq_quantize",
           "gptq_quantize_k", "hessian_sum"]

logger = logging.getLogger(__name__)


def accumulate_hessian(
    x: torch.Tensor,
    w: torch.Tensor | None,
    H: torch.Tensor | None,
    n_seen: int,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, int]:
    """Fold a batch of layer inputs into the running mean of Xᵀ diag(w) X.

    Args:
        x: layer inputs, (batch, seq, d) or (n, d).
        w: token weights, (seq,) or (batch, seq) for 3-d x, (n,) for 2-d x; None means all ones.
        H: the running mean so far, (d, d), or None to start (a zero matrix of `dtype`).
        n_seen: number of tokens already folded into H.
        dtype: dtype of a new H; the update is computed in H's dtype (float64 for exact accumulation).

    Returns:
        (H, n_seen + number of tokens in x), with H = (1/n) Σ_i w_i x_i x_iᵀ over all n tokens seen.
    """
    d, wf = _token_weights(x, w)  # wf: (n,)
    if n_seen < 0:
        raise ValueError(f"n_seen must be >= 0, got {n_seen}")
    if H is None:
        H = torch.zeros(d, d, dtype=dtype, device=x.device)
    elif tuple(H.shape) != (d, d):
        raise ValueError(f"H must have shape ({d}, {d}), got {tuple(H.shape)}")
    xf = x.reshape(-1, d).to(H.dtype)  # xf: (n, d)
    n_new = n_seen + xf.shape[0]
    if n_new == 0:
        return H, 0
    wx = xf * wf.to(H.dtype).unsqueeze(1)  # (n, d): row i is w_i x_i
    H = H * (n_seen / n_new) + wx.t() @ xf / n_new  # (d, d)
    return H, n_new


def hessian_sum(x: torch.Tensor, w: torch.Tensor | None, dtype: torch.dtype = torch.float64
                ) -> tuple[torch.Tensor, int]:
    """Σ_i w_i x_i x_iᵀ over the tokens of one batch, and the number of tokens.

    x: (batch, seq, d) or (n, d); w: as in `accumulate_hessian`. The sum is computed in `dtype`. Adding
    the sums of the batches in a fixed order and dividing by the total count gives the mean Hessian;
    the result then depends only on that order, not on which process computed which batch.
    """
    d, wf = _token_weights(x, w)  # wf: (n,)
    xf = x.reshape(-1, d).to(dtype)  # (n, d)
    if w is not None:
        xf = xf * wf.to(dtype).sqrt().unsqueeze(1)  # row i is sqrt(w_i) x_i
    return gram(xf), xf.shape[0]  # (d, d)


def drift_sum(x_fp: torch.Tensor, x: torch.Tensor, w: torch.Tensor | None,
              dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Σ_i w_i (x_fp,i - x_i) x_iᵀ (d, d) over one batch: how far the inputs x a quantized prefix gives a
    linear drifted from the inputs x_fp the FP prefix gives it (both (batch, seq, d) or (n, d)), against x.
    Added over batches and divided by the token count like `hessian_sum` (same weights w)."""
    if x_fp.shape != x.shape:
        raise ValueError(f"x_fp {tuple(x_fp.shape)} and x {tuple(x.shape)} must have the same shape")
    d, wf = _token_weights(x, w)  # wf: (n,)
    xf = x.reshape(-1, d).to(dtype)  # (n, d)
    delta = (x_fp.reshape(-1, d).to(dtype) - xf) * wf.to(dtype).unsqueeze(1)  # (n, d): w_i (x_fp,i - x_i)
    return delta.t() @ xf  # (d, d)


@torch.no_grad()
def drift_target(W: torch.Tensor, H: torch.Tensor, D: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """The weight W' (out, d) float32 to round so that W' x matches W x_fp, the output of the FP prefix.

    Rounding W' under H minimises Σ w_i |W x_fp,i - Q x_i|² (GPTAQ's asymmetric calibration), since that
    objective is |Q - W'|²_H plus a constant for W' = W + W D H^-1, where H = mean w_i x_i x_iᵀ and D =
    mean w_i (x_fp,i - x_i) x_iᵀ (`drift_sum`). H is damped like `gptq_factor` (λ = damp · mean diag H), which
    pulls W' towards W where the inputs carry little energy; with no drift (D = 0) W' is W exactly.
    """
    Hd = H.double().clone()  # (d, d)
    dead = torch.diag(Hd) == 0
    Hd[dead, dead] = 1.0
    Hd.diagonal().add_(damp * Hd.diagonal().mean())
    correction = torch.linalg.solve(Hd, D.double().t() @ W.double().t()).t()  # W D H^-1: (out, d); H symmetric
    return (W.double() + correction).float()


def gram(x: torch.Tensor, rows: int = 256) -> torch.Tensor:
    """xᵀx (d, d) for x (n, d). Wider than `rows`: from its upper block triangle (row block i of `rows`
    rows is x[:, i]ᵀ x[:, i:], mirrored below the diagonal), which takes about (1 + rows / d) / 2 of a full
    product's multiply-adds (0.65x its time at d = 1408 on a CPU)."""
    n, d = x.shape
    if d <= rows:
        return x.t() @ x
    H = torch.empty(d, d, dtype=x.dtype, device=x.device)
    for i in range(0, d, rows):
        part = x[:, i:i + rows].t() @ x[:, i:]  # (rows, d - i): row block i from the diagonal on
        H[i:i + rows, i:] = part
        H[i + rows:, i:i + rows] = part[:, rows:].t()
    return H


def _token_weights(x: torch.Tensor, w: torch.Tensor | None) -> tuple[int, torch.Tensor]:
    """(d, flat non-negative token weights (n,)) for x (batch, seq, d) or (n, d), after checking shapes."""
    if x.dim() == 3:
        batch, seq, d = x.shape
        wf = expand_token_weights(w, batch, seq, x.device).reshape(-1)  # (batch * seq,)
    elif x.dim() == 2:
        d = x.shape[1]
        if w is not None and tuple(w.shape) != (x.shape[0],):
            raise ValueError(f"w must have shape ({x.shape[0]},) for 2-d x, got {tuple(w.shape)}")
        wf = torch.ones(x.shape[0], device=x.device) if w is None else w.float()  # (n,)
    else:
        raise ValueError(f"x must be (batch, seq, d) or (n, d), got shape {tuple(x.shape)}")
    if bool((wf < 0).any()):
        raise ValueError("w must be non-negative")
    return d, wf


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor | None,
    bits: int,
    group_size: int = -1,
    damp: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
    clip: torch.Tensor | float | None = None,
    max_damp_tries: int = 4,
    scale_dtype: torch.dtype = torch.float32,
    factor: GPTQFactor | None = None,
    grid: WeightGrid = WeightGrid.FULL,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ rounding of W (out, in) for inputs with second moment H (in, in).

    Linears that share an input can share one `gptq_factor(H)` (pass `factor=`, H may then be None;
    damp / act_order / max_damp_tries are the factor's).

    Returns (codes, scale): int8 codes (out, in) in [-2^(b-1), 2^(b-1) - 1] and float32 scales
    (out, n_groups), so that `ops.dequantize_weight(codes, scale, group_size)` is Ŵ.

    Scales. Per channel (group_size = -1) they come from the W passed in (clip · max|w| / grid_top, `grid`
    as in `ops.grid_top`), so with
    H = I (no error feedback) the codes equal `ops.quantize_weight(W, ops.weight_scale(W, ...))`
    bit for bit. Per group they are computed when the loop reaches the group's first column, from the
    columns as updated by the error feedback so far (GPTQ's choice); the block size is rounded to a
    multiple of group_size so that a group never straddles a lazy-update block. With act_order and groups,
    each group keeps its original, contiguous columns (so the codes need no g_idx) and its scale is
    computed up front from W ("static groups"), since the loop visits a group's columns out of order.

    On the searched grid (`ops.searched_scale`) each group's scale is the candidate with the least
    round-off weighted by diag(H), the same information an importance matrix carries; per channel or
    with act_order it is searched up front on W.

    Dead inputs (diag(H) = 0: the input is always zero) get H_jj = 1 and W[:, j] = 0, as GPTQ does, so
    their codes are 0. H is damped by damp · mean(diag(H)) before the inverse; if the damped H is still
    not positive definite, damping is retried ×10 (warning each time), up to `max_damp_tries` tries.

    Worked 2×2 example (bits 4, damp 0, grid "symmetric"): W = [[0.325, 1.4]], H = [[4, 1.8], [1.8, 1]].
    scale = 1.4 / 7 = 0.2. Column 0: 0.325 / 0.2 = 1.625 → code 2 (0.4), error −0.075. The error is fed
    to column 1 in proportion H_01 / H_11 = 1.8: 1.4 − 0.075 · 1.8 = 1.265 → code 6 (RTN says 7).
    Output error eᵀHe: RTN e = [−0.075, 0] gives 0.0225; GPTQ e = [−0.075, 0.2] gives 0.0085.
    """
    _check_gptq_args(W, bits, group_size, damp, block_size, max_damp_tries)
    W, factor = _prepared(W, H, factor, damp, act_order, max_damp_tries)
    clip = 1.0 if clip is None else clip
    static = None  # scales fixed before the loop: (out, n_groups)
    if group_size == -1 or factor.act_order:
        static = weight_scale(W, bits, group_size, clip, grid, factor.diag, scale_dtype)
        static = static.to(scale_dtype).float()  # on the stored grid
    codes, scale, _ = _column_loop(_permuted(W, factor), factor.hinv, factor.perm.tolist(), static, bits,
                                   group_size, block_size, clip, scale_dtype, grid, factor.diag[factor.perm])
    codes = codes[:, torch.argsort(factor.perm)]  # back to the original column order
    return codes.to(torch.int8), scale


def gptq_quantize_k(W: torch.Tensor, H: torch.Tensor | None, grid: BlockGrid, damp: float = 0.01,
                    act_order: bool = False, max_damp_tries: int = 4, factor: GPTQFactor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """GPTQ rounding of W (out, in) in a K-quant grid (`grids.BlockGrid`): codes (out, in) int8, scales and mins
    (out, in / group) float32 (mins None for Q6_K), so that `grids.values` is Ŵ.

    Each super-block's scales and mins are searched (`grids.choose`, importance diag(H)) when the loop
    reaches its first column, from the columns as the error feedback has updated them (GPTQ's choice for
    groups; with act_order, up front from W), then its columns are rounded one by one in that grid.
    """
    _check_gptq_args(W, grid.bits, grid.group, damp, SUPER_BLOCK, max_damp_tries)
    W, factor = _prepared(W, H, factor, damp, act_order, max_damp_tries)
    static = choose(grid, W, factor.diag) if factor.act_order else None
    codes, scale, mins = _column_loop(_permuted(W, factor), factor.hinv, factor.perm.tolist(), static, grid.bits,
                                      grid.group, SUPER_BLOCK, 1.0, torch.float32, grid, factor.diag[factor.perm])
    codes = codes[:, torch.argsort(factor.perm)]
    return codes.to(torch.int8), scale, mins


def _prepared(W: torch.Tensor, H: torch.Tensor | None, factor: GPTQFactor | None, damp: float, act_order: bool,
              max_damp_tries: int) -> tuple[torch.Tensor, GPTQFactor]:
    """W (out, in) as a float32 copy with dead inputs zeroed, and the factor of H (made if not given)."""
    n_cols = W.shape[1]
    if factor is None:
        if H is None:
            raise ValueError("gptq_quantize needs H or a factor from gptq_factor(H)")
        if tuple(H.shape) != (n_cols, n_cols):
            raise ValueError(f"H must have shape ({n_cols}, {n_cols}), got {tuple(H.shape)}")
        factor = gptq_factor(H, damp, act_order, max_damp_tries)  # checks H is finite
    elif factor.perm.numel() != n_cols:
        raise ValueError(f"factor is for {factor.perm.numel()} input columns, W has {n_cols}")
    W = W.detach().float().clone()  # W: (out, in)
    W[:, factor.dead] = 0.0
    return W, factor


def _permuted(W: torch.Tensor, factor: GPTQFactor) -> torch.Tensor:
    return W[:, factor.perm] if factor.act_order else W


@dataclass(frozen=True)
class GPTQFactor:
    """What GPTQ needs from H, computed once for every linear that reads the same input (q/k/v, gate/up)."""

    hinv: torch.Tensor  # (in, in) float32: upper Cholesky factor U of (H + λI)^-1 = UᵀU, in processing order
    perm: torch.Tensor  # (in,) processing order (act-order: descending diag(H); else identity)
    dead: torch.Tensor  # (in,) bool: inputs that are always zero (diag(H) = 0)
    act_order: bool
    diag: torch.Tensor  # (in,) float32 diag(H) before damping, original order: the searched grid's importance


def gptq_factor(H: torch.Tensor, damp: float = 0.01, act_order: bool = False, max_damp_tries: int = 4,
                overwrite: bool = False) -> GPTQFactor:
    """Damp, (optionally) permute and factor H (in, in) for `gptq_quantize(..., factor=...)`.

    Works in float64. `overwrite=True` lets it damp a float64 H in place instead of copying it (the caller
    gives H up): for a 12288-wide input that saves a 1.2 GB copy; at most H and two more (in, in) float64
    matrices are alive at once.
    """
    n = H.shape[0] if H.dim() == 2 else -1
    if tuple(H.shape) != (n, n):
        raise ValueError(f"H must be square (in, in), got shape {tuple(H.shape)}")
    if not bool(torch.isfinite(H).all()):
        raise ValueError("H contains NaN or inf")
    if damp < 0:
        raise ValueError(f"damp must be >= 0, got {damp}")
    if max_damp_tries < 1:
        raise ValueError(f"max_damp_tries must be >= 1, got {max_damp_tries}")
    H = H.detach()
    H = H if overwrite and H.dtype == torch.float64 else H.double().clone()  # H: (in, in)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)  # (in,)
        H = H[perm][:, perm]
    else:
        perm = torch.arange(n, device=H.device)
    diag = torch.diag(H)[torch.argsort(perm)].float()  # (in,) original order, before damping
    hinv = _inverse_cholesky_upper(H, damp, max_damp_tries)  # (in, in) float32, upper triangular
    return GPTQFactor(hinv=hinv, perm=perm, dead=dead, act_order=act_order, diag=diag)


def _check_gptq_args(W, bits, group_size, damp, block_size, max_damp_tries) -> None:
    if W.dim() != 2:
        raise ValueError(f"W must be (out, in), got shape {tuple(W.shape)}")
    n_cols = W.shape[1]
    if not bool(torch.isfinite(W).all()):
        raise ValueError("W contains NaN or inf")
    qmax(bits)  # validates bits
    if group_size != -1 and (group_size <= 0 or n_cols % group_size):
        raise ValueError(f"group_size {group_size} must be -1 or a positive divisor of in_features {n_cols}")
    if damp < 0:
        raise ValueError(f"damp must be >= 0, got {damp}")
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if max_damp_tries < 1:
        raise ValueError(f"max_damp_tries must be >= 1, got {max_damp_tries}")


def _inverse_cholesky_upper(H: torch.Tensor, damp: float, max_tries: int) -> torch.Tensor:
    """Upper Cholesky factor U (float32) of (H + λ I)^-1 (Hinv = UᵀU), λ = damp · mean(diag(H)), retrying λ ×10.

    H (float64, private to the caller) has its diagonal damped in place; no identity matrix is built.
    """
    diag = H.diagonal()  # a view: writing it damps H
    base = diag.clone()
    mean_diag = base.mean()
    damps = [damp] + [max(damp, 1e-3) * 10**t for t in range(1, max_tries)]
    for t, d in enumerate(damps):
        diag.copy_(base + d * mean_diag)
        L, info = torch.linalg.cholesky_ex(H)  # lower, (in, in)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)  # (in, in)
            del L
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            del Hinv
            if int(info) == 0:
                return U.float()
        if t + 1 < len(damps):
            logger.warning("GPTQ: H is not positive definite with damp=%g; retrying with damp=%g",
                           d, damps[t + 1])
    raise ValueError(
        f"H is not positive definite even with damp={damps[-1]:g} (times mean diag {float(mean_diag):.3g}); "
        "check the calibration inputs"
    )


def _column_loop(
    W: torch.Tensor,
    Hinv: torch.Tensor,
    perm: list[int],
    static: torch.Tensor | tuple[torch.Tensor, torch.Tensor | None] | None,
    bits: int,
    group_size: int,
    block_size: int,
    clip: torch.Tensor | float,
    scale_dtype: torch.dtype = torch.float32,
    grid: WeightGrid | BlockGrid = WeightGrid.FULL,
    importance: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """GPTQ's column loop with lazy block updates, on columns already in processing order.

    W: (out, in) float32, permuted; Hinv: (in, in) upper Cholesky factor of the damped inverse, permuted;
    perm[j]: original index of processed column j; importance: (in,) diag(H), permuted (the searched grids
    weigh round-off by it); static: scales (out, n_groups), or (scales, mins) on a K grid, fixed up front.
    Returns codes (out, in) as float in processing order and the scales and mins (out, n_groups) indexed
    by original group (mins None on symmetric grids). On a block grid a weight is s * level(code) - m
    (`grids.level`: code + offset, or a codebook value).
    """
    out_f, n_cols = W.shape
    block_grid = grid if isinstance(grid, BlockGrid) else None
    lo, hi, g = -qmax(bits) - 1, qmax(bits), group_size
    span = block_grid.span if block_grid else g  # columns whose scales are chosen together
    if static is None:  # scales found in the loop: keep every span inside one block
        block_size = max(block_size // span, 1) * span
        scale, mins = torch.zeros(out_f, n_cols // g, device=W.device), torch.zeros(out_f, n_cols // g, device=W.device)
    else:
        scale, mins = static if block_grid else (static, None)
        mins = torch.zeros_like(scale) if mins is None else mins
    col_group = [0] * n_cols if g == -1 else [p // g for p in perm]  # original group of each column
    Q = torch.zeros_like(W)  # codes, processing order
    for i1 in range(0, n_cols, block_size):
        i2 = min(i1 + block_size, n_cols)
        W1 = W[:, i1:i2].clone()  # (out, count): the block, updated in place
        Err1 = torch.zeros_like(W1)  # (out, count): scaled errors, for the lazy update of later blocks
        Hinv1 = Hinv[i1:i2, i1:i2]  # (count, count)
        for i in range(i2 - i1):
            j = i1 + i
            if static is None and j % span == 0:
                imp = None if importance is None else importance[j:j + span]  # (span,)
                if block_grid:
                    s_new, m_new = choose(block_grid, W1[:, i:i + span], imp)  # (out, span / g) each
                    scale[:, j // g:(j + span) // g] = s_new
                    mins[:, j // g:(j + span) // g] = 0.0 if m_new is None else m_new
                else:
                    scale[:, j // g] = _group_scale(W1[:, i:i + g], Hinv1[i:i + g, i:i + g], bits, clip, grid,
                                                    imp, scale_dtype)
            s, m = scale[:, col_group[j]], mins[:, col_group[j]]  # (out,)
            w = W1[:, i]  # (out,)
            if block_grid:
                q = nearest(block_grid, w, s, m)
                value = s * level(block_grid, q) - m
            else:
                q = torch.round(w / s).clamp(lo, hi)
                value = q * s
            Q[:, j] = q
            err1 = (w - value) / Hinv1[i, i]  # (out,)
            W1[:, i:] -= err1.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)  # (out, count - i)
            Err1[:, i] = err1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # (out, in - i2): lazy update of the later columns
    return Q, scale, (mins if block_grid and block_grid.asymmetric else None)


def _group_scale(W: torch.Tensor, Hinv: torch.Tensor, bits: int, clip: torch.Tensor | float, grid: WeightGrid,
                 importance: torch.Tensor | None, scale_dtype: torch.dtype) -> torch.Tensor:
    """The scale (out,) of the group whose columns W (out, g) the loop is about to quantize.

    On the searched grid every candidate of `ops.scale_candidates` (importance: diag(H) of the group) is
    tried by running the group's own GPTQ steps with it (Hinv: the group's (g, g) block of the factor), and
    each row keeps the candidate whose error feedback leaves the least loss sum_i ((w_i - q_i s) / Hinv_ii)^2
    inside the group: the scale is chosen for the codes GPTQ will actually write, not for plain rounding.
    """
    if WeightGrid(grid) is not WeightGrid.SEARCH:
        return weight_scale(W, bits, -1, clip, grid)[:, 0].to(scale_dtype).float()
    cand = scale_candidates(W, bits, importance, clip, scale_dtype)  # (out, C)
    lo, hi = -qmax(bits) - 1, qmax(bits)
    Wc = W.unsqueeze(1).repeat(1, cand.shape[1], 1)  # (out, C, g): one copy of the group per candidate
    loss = torch.zeros_like(cand)  # (out, C)
    for i in range(W.shape[1]):
        w = Wc[:, :, i]  # (out, C)
        err = (w - torch.round(w / cand).clamp(lo, hi) * cand) / Hinv[i, i]  # (out, C)
        loss += err * err
        Wc[:, :, i:] -= err.unsqueeze(-1) * Hinv[i, i:]  # (out, C, g - i)
    return cand.gather(1, loss.argmin(1, keepdim=True))[:, 0]
