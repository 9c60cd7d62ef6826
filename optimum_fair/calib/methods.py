"""The calibration methods as data: one record per `Transform` and per `Rounding`.

A record says what the method fits, what a packed layer stores for it, whether it folds into the weights
(nothing left to compute at run time) and which export formats accept it. The pipeline reads these records
instead of branching on the enums:

    TRANSFORMS[Transform.HADAMARD].online       # True: the layer rotates its input at run time
    ROUNDINGS[Rounding.GPTQ].hessian            # True: fit each group's Hessian, round with it
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..enums import KronInit, Rounding, Transform, WeightGrid
from ..grids import BlockGrid, choose, round_codes
from ..ops import quantize_weight, weight_scale
from .gptq import GPTQFactor, gptq_quantize, gptq_quantize_k

__all__ = ["EXPORT_FORMATS", "ROUNDINGS", "TRANSFORMS", "RoundingMethod", "TransformMethod", "rounding_method"]

#: Where a packed layer can go: "fair" (this package's checkpoint), GGUF (llama.cpp), compressed-tensors (vLLM).
EXPORT_FORMATS = frozenset({"fair", "gguf", "compressed-tensors"})

#: What a rounding gives: codes (out, d) int8, scales (out, n_groups) and mins (out, n_groups) or None.
Rounded = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]


@dataclass(frozen=True)
class TransformMethod:
    """What one `Transform` fits and what a packed layer stores for it."""

    transform: Transform
    kron: KronInit  # how the Kronecker factors A, B start (NONE: no rotation)
    smooth_alpha: float | None  # SmoothQuant's alpha of the per-channel scale s from the input absmax; None: no s
    clips: bool  # a learned activation clip (stored) and per-row weight clips (folded into the scales)
    learned: bool  # A, B, s and the clips fitted on the block loss (`fit_transforms`): needs every FP target
    stores: tuple[str, ...]  # the FairLinear buffers it adds beyond codes, scales and bias
    formats: frozenset[str]  # the export formats that accept it

    @property
    def online(self) -> bool:
        """Whether the layer transforms its input at run time (False: everything folds into the weights)."""
        return bool(self.stores)

    @property
    def calibrated(self) -> bool:
        """Whether it is made in Stage II's block loop (False: each linear is converted on its own)."""
        return self.online


@dataclass(frozen=True)
class RoundingMethod:
    """What one `Rounding` fits; both store integer codes and scales only, so both fold into the weights
    and every export format takes them."""

    rounding: Rounding
    hessian: bool  # fits each group's (token-weighted) Hessian and rounds with its factor
    quantize: Callable[..., tuple[torch.Tensor, torch.Tensor]]  # (W, bits, group_size, clip, grid, ...) -> codes, scale
    formats: frozenset[str] = EXPORT_FORMATS

    @property
    def calibrated(self) -> bool:
        """Whether it needs calibration data (False: round-to-nearest, each linear on its own)."""
        return self.hessian


def round_to_nearest(W: torch.Tensor, bits: int, group_size: int, clip: torch.Tensor | float,
                     grid: WeightGrid | BlockGrid, scale_dtype: torch.dtype, **_) -> Rounded:
    """codes (out, d) int8, scale (out, n_groups) and mins (K grids) of W (out, d), each weight rounded on
    its own."""
    if isinstance(grid, BlockGrid):
        scale, mins = choose(grid, W)
        return round_codes(grid, W, scale, mins), scale, mins
    scale = weight_scale(W, bits, group_size, clip, grid, scale_dtype=scale_dtype)
    scale = scale.to(scale_dtype).float()  # (out, n_groups)
    return quantize_weight(W, scale, bits, group_size), scale, None


def gptq_rounding(W: torch.Tensor, bits: int, group_size: int, clip: torch.Tensor | float,
                  grid: WeightGrid | BlockGrid, scale_dtype: torch.dtype, H: torch.Tensor | None = None,
                  factor: GPTQFactor | None = None, damp: float = 0.01, act_order: bool = False,
                  block_size: int = 128) -> Rounded:
    """`gptq_quantize` (or `gptq_quantize_k` on a K grid) of W (out, d) with the Hessian H (d, d) of its
    inputs, or its shared `factor`."""
    if H is None and factor is None:
        raise ValueError("H is required for rounding='gptq' (or factor=gptq_factor(H))")
    if isinstance(grid, BlockGrid):
        return gptq_quantize_k(W, H, grid, damp, act_order, factor=factor)
    codes, scale = gptq_quantize(W, H, bits, group_size, damp=damp, act_order=act_order, block_size=block_size,
                                 clip=clip, scale_dtype=scale_dtype, factor=factor, grid=grid)
    return codes, scale, None


_KRON = ("transform_a", "transform_b")
TRANSFORMS: dict[Transform, TransformMethod] = {
    Transform.NONE: TransformMethod(Transform.NONE, KronInit.NONE, smooth_alpha=None, clips=False, learned=False,
                                    stores=(), formats=EXPORT_FORMATS),
    # QuaRot-style: a fixed random rotation; GGUF and compressed-tensors have no online transform
    Transform.HADAMARD: TransformMethod(Transform.HADAMARD, KronInit.HADAMARD, smooth_alpha=None, clips=False,
                                        learned=False, stores=_KRON, formats=frozenset({"fair"})),
    Transform.FLATQUANT: TransformMethod(Transform.FLATQUANT, KronInit.HADAMARD, smooth_alpha=0.3, clips=True,
                                         learned=True, stores=(*_KRON, "input_scale", "act_clip"),
                                         formats=frozenset({"fair"})),
}

ROUNDINGS: dict[Rounding, RoundingMethod] = {
    Rounding.RTN: RoundingMethod(Rounding.RTN, hessian=False, quantize=round_to_nearest),
    Rounding.GPTQ: RoundingMethod(Rounding.GPTQ, hessian=True, quantize=gptq_rounding),
}


def rounding_method(rounding: Rounding) -> RoundingMethod:
    """The record of `rounding`; ValueError naming the roundings for anything else."""
    try:
        return ROUNDINGS[rounding]
    except KeyError:
        raise ValueError(f"rounding must be one of {[r.value for r in ROUNDINGS]}, got {rounding!r}") from None
