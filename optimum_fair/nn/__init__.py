"""Quantized modules."""

from .linear import FairLinear, kron_apply

__all__ = ["FairLinear", "kron_apply"]
