"""The calibration loss: a per-position weighted mean squared error (FAIR-Calib Stage II, the paper's section 3).

    L = Σ_{b,i} w_{b,i} ‖out_{b,i} − ref_{b,i}‖² / (Σ_{b,i} w_{b,i} · d)

With w ≡ 1 this is `F.mse_loss(out, ref)`; the position prior w̄ of Stage I makes it frontier-aware.
"""

from __future__ import annotations

import torch

__all__ = ["weighted_mse", "weighted_sq_error"]


def expand_token_weights(w: torch.Tensor | None, batch: int, seq: int, device: torch.device) -> torch.Tensor:
    """Per-token weights (seq,) or (batch, seq) (None: all ones) as a float32 (batch, seq) tensor."""
    if w is None:
        return torch.ones(batch, seq, device=device)
    if w.dim() == 1 and w.shape[0] == seq:
        return w.float().to(device).expand(batch, seq)  # (seq,) -> (batch, seq)
    if w.dim() == 2 and tuple(w.shape) == (batch, seq):
        return w.float().to(device)
    raise ValueError(f"w must have shape ({seq},) or ({batch}, {seq}), got {tuple(w.shape)}")


def weighted_mse(ref: torch.Tensor, out: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    """Token-weighted MSE between a reference and an output, as a float32 scalar.

    Args:
        ref: the full-precision block output, (batch, seq, d).
        out: the quantized block output, same shape (gradients flow through it).
        w: non-negative token weights, (seq,) shared across the batch or (batch, seq); None means all ones.

    Example: ref = 0, out = [[[1, 1], [2, 2]]] (batch 1, seq 2, d 2), w = [3, 1]:
    (3 · 2 + 1 · 8) / ((3 + 1) · 2) = 14 / 8 = 1.75.
    """
    if ref.dim() != 3:
        raise ValueError(f"ref must be (batch, seq, d), got shape {tuple(ref.shape)}")
    if out.shape != ref.shape:
        raise ValueError(f"out shape {tuple(out.shape)} does not match ref shape {tuple(ref.shape)}")
    batch, seq, d = ref.shape
    wt = expand_token_weights(w, batch, seq, ref.device)  # (batch, seq)
    if w is not None and bool((wt < 0).any()):
        raise ValueError("w must be non-negative")
    sq = (out.float() - ref.float()).pow(2).sum(dim=-1)  # (batch, seq)
    return (wt * sq).sum() / (wt.sum() * d)


def weighted_sq_error(ref: torch.Tensor, out: torch.Tensor, w: torch.Tensor | None = None,
                      dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample numerator and denominator of `weighted_mse`, in `dtype`.

    Returns num (batch,) = Σ_i w_{b,i} ‖out_{b,i} − ref_{b,i}‖² (gradients flow through it) and
    den (batch,) = Σ_i w_{b,i} · d, so weighted_mse = num.sum() / den.sum() up to rounding. Summing the
    per-sample terms of several batches (or processes) gives the loss over all of them.
    """
    if ref.dim() != 3:
        raise ValueError(f"ref must be (batch, seq, d), got shape {tuple(ref.shape)}")
    if out.shape != ref.shape:
        raise ValueError(f"out shape {tuple(out.shape)} does not match ref shape {tuple(ref.shape)}")
    batch, seq, d = ref.shape
    wt = expand_token_weights(w, batch, seq, ref.device).to(dtype)  # (batch, seq)
    if w is not None and bool((wt < 0).any()):
        raise ValueError("w must be non-negative")
    sq = (out.to(dtype) - ref.to(dtype)).pow(2).sum(dim=-1)  # (batch, seq)
    return (wt * sq).sum(dim=-1), wt.sum(dim=-1) * d
