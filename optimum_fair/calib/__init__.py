"""Calibration math, pure torch: the weighted loss, weighted GPTQ, Hadamard rotations, learned transforms,
and the methods as data (`methods.TRANSFORMS`, `methods.ROUNDINGS`).

Nothing here imports transformers or receives a config object; every function takes plain arguments.
"""

from .gptq import accumulate_hessian, gptq_quantize, hessian_sum
from .methods import ROUNDINGS, TRANSFORMS, RoundingMethod, TransformMethod
from .objective import weighted_mse, weighted_sq_error
from .rotation import hadamard, kron_factors, random_hadamard_factors, random_orthogonal
from .transforms import (
    CalibLinear,
    TransformParams,
    channel_absmax,
    fit_transforms,
    hadamard_transform,
    smooth_scale,
    transform_params,
)

__all__ = [
    "ROUNDINGS",
    "TRANSFORMS",
    "CalibLinear",
    "RoundingMethod",
    "TransformMethod",
    "TransformParams",
    "accumulate_hessian",
    "channel_absmax",
    "fit_transforms",
    "gptq_quantize",
    "hadamard",
    "hadamard_transform",
    "hessian_sum",
    "kron_factors",
    "random_hadamard_factors",
    "random_orthogonal",
    "smooth_scale",
    "transform_params",
    "weighted_mse",
    "weighted_sq_error",
]
