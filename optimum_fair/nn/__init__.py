"""Quantized modules and the integer kernels they run on."""

from .dispatch import reference_kernels, use_kernels
from .kernels import KERNELS
from .linear import FairLinear, kron_apply

__all__ = ["KERNELS", "FairLinear", "kron_apply", "reference_kernels", "use_kernels"]
