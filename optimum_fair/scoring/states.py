"""Decoding-like Stage II inputs: calibration text in the partially masked states of a diffusion decode.

The paper calibrates on fully observed text. DLLMQuant and Quant-dLLM instead calibrate on the states the
model meets while decoding: a visible prefix, earlier semi-autoregressive blocks already committed, the
current block partly committed and later blocks still masked. `decoding_states` builds such states from
calibration windows under the same random commit policy as Stage I, one random step per sample, and the
token weights that go with them: with a prior, the positions about to be committed (the still-masked
positions of the current block, where the next frontier decisions are made) keep their prior weight and
every other position gets the floor ε; without a prior, every position weighs 1.

Example: window 8, block 4, steps 8 (2 steps per block, 2 tokens per step), a sample drawn at step 3:
block 0 is committed, block 1 has 2 of its 4 positions committed (a random pair) and 2 masked; the
prefix is visible; the weight is w̄_i on those 2 masked positions and ε·w̄_i elsewhere, rescaled to mean 1.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["decoding_states"]


def decoding_states(
    ids: Tensor, window: int, block_length: int, steps: int, mask_id: int, generator: torch.Generator,
    prior: Tensor | None = None, floor: float = 0.05,
) -> tuple[Tensor, Tensor]:
    """Mask each calibration window as a decode state at a random step.

    Args:
        ids: (n, seq) calibration token ids; the last `window` positions are the generation window.
        window, block_length, steps: the decode settings of Stage I (window % block_length == 0,
            steps % (window // block_length) == 0).
        mask_id: the mask token id.
        generator: draws the step of each sample and the commit order inside its current block.
        prior: (seq,) position prior w̄ (mean 1 over the window), or None for uniform weights.
        floor: ε, the relative weight of positions that are not about to be committed.

    Returns:
        states (n, seq) with masked positions set to `mask_id`, and weights (n, seq), mean 1 per row.
    """
    n, seq = ids.shape
    blocks = window // block_length
    if window > seq or window % block_length or steps % blocks:
        raise ValueError(f"decode settings window={window}, block_length={block_length}, steps={steps} do not "
                         f"fit sequences of {seq} tokens")
    per_block = steps // blocks
    step = torch.randint(0, steps, (n,), generator=generator)  # (n,)
    current = step // per_block  # (n,) block being decoded
    done = (step % per_block) * block_length // per_block  # (n,) positions of it already committed
    order = torch.rand(n, block_length, generator=generator).argsort(-1).argsort(-1)  # (n, block) commit rank
    pos = torch.arange(window)  # (window,)
    blk, inner = pos // block_length, pos % block_length
    masked = (blk[None] > current[:, None]) | (
        (blk[None] == current[:, None]) & (order[:, inner] >= done[:, None]))  # (n, window)
    frontier = masked & (blk[None] == current[:, None])  # (n, window): about to be committed
    states = ids.clone()
    states[:, seq - window:][masked] = mask_id
    weights = torch.ones(n, seq)
    if prior is not None:
        if prior.shape != (seq,):
            raise ValueError(f"prior must have shape ({seq},), got {tuple(prior.shape)}")
        mark = torch.full((n, seq), float(floor))
        mark[:, seq - window:][frontier] = 1.0
        weights = prior.float()[None] * mark
        weights = weights / weights.mean(-1, keepdim=True)
    return states, weights


def noisy_canvases(ids: Tensor, vocab_size: int, generator: torch.Generator) -> Tensor:
    """States of a uniform-noise diffusion model (DiffusionGemma denoises a canvas of random tokens):
    sample i keeps each token with probability 1 - r_i and replaces it by a uniformly random token
    otherwise, noise levels r_i ~ U(0, 1) per sample. ids: (n, seq) -> (n, seq)."""
    n, seq = ids.shape
    level = torch.rand(n, 1, generator=generator)  # (n, 1)
    noise = torch.rand(n, seq, generator=generator) < level  # (n, seq)
    random = torch.randint(0, vocab_size, (n, seq), generator=generator)
    return torch.where(noise, random, ids)
