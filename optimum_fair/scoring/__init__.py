"""Diffusion decoding with commit traces, and the Stage I position prior (pure torch)."""

from .block_sampler import llada2_decode
from .prior import PositionPrior
from .sampler import dream_decode, llada_decode
from .trace import DecodeTrace

__all__ = ["DecodeTrace", "PositionPrior", "dream_decode", "llada2_decode", "llada_decode"]
