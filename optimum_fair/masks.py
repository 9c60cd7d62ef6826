"""The block-diffusion attention mask, shared by the models that use it (`modeling`) and the sampler that
decodes them (`scoring.block_sampler`); pure torch, so both layers can import it."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["block_diffusion_mask"]


def block_diffusion_mask(seq_len: int, block_length: int, device=None) -> Tensor:
    """(1, 1, seq, seq) bool attention mask of block diffusion (LLaDA2): position i sees position j when
    j's block (blocks of ``block_length`` from position 0) is not after i's. True = attend."""
    if block_length < 1:
        raise ValueError(f"block_length must be a positive int, got {block_length}")
    block = torch.arange(seq_len, device=device) // block_length  # (seq,)
    return (block[None, :] <= block[:, None])[None, None]
