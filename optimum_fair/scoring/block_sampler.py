"""LLaDA2's block-diffusion sampler (its released ``generate``), over a plain ``logits_fn``, with commits.

The canvas is cut into blocks of ``block_length`` from position 0, and every forward sees them through
the block-causal mask (`masks.block_diffusion_mask`): a block attends to itself and to earlier blocks.
Blocks are decoded left to right, at most ``steps`` forward passes each. At step j of a block every
masked position proposes a token (argmax, or a sample at ``temperature`` > 0 after top-k / top-p) with
probability p; all masked positions with p > ``threshold`` are committed if they are at least the
schedule's count for step j (``block_length`` split evenly over ``steps``, remainder first), else the
count's most confident ones. A block that fills up early ends; its unused step slots stay in the trace
with no commit and the state unchanged (a forward there would read the same state), so the trace keeps
``steps`` slots per block like LLaDA's. Differences from the release, all deliberate: the mask token is
never proposed (as in the other samplers), every block is decoded (the release stops after the block
holding the first EOS; blocks are causal, so the tokens before it are the same), and the prompt and the
answer must each fill whole blocks (the release lets the first answer block start inside the prompt's).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..masks import block_diffusion_mask
from .checks import check_nonneg, check_positive_int, check_prompt
from .forward import LogitsFn, forbid_mask, predict_window
from .policies import filter_top_k, filter_top_p, llada_transfer_counts, select_parallel
from .sampler import Recorder, canvas
from .trace import DecodeTrace

__all__ = ["llada2_decode"]


def _propose(logits: Tensor, temperature: float, top_k: int | None, top_p: float | None,
             generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """(batch, block, vocab) logits -> proposals x0 and their probabilities p, each (batch, block)."""
    logits64 = logits.double()
    if temperature > 0:
        logits64 = logits64 / temperature
    probs = filter_top_p(filter_top_k(logits64, top_k), top_p).softmax(-1)
    if temperature > 0:
        x0 = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator).view(probs.shape[:-1])
    else:
        x0 = probs.argmax(-1)
    return x0, probs.gather(-1, x0.unsqueeze(-1)).squeeze(-1)


def _threshold_choose(p: Tensor, masked: Tensor, count: int, threshold: float) -> Tensor:
    """(batch, block) bool: the masked positions above threshold if there are >= count, else the top count
    (`policies.select_parallel` with the release's strict comparison)."""
    conf = p.masked_fill(~masked, float("-inf"))
    return select_parallel(conf, torch.full_like(masked.sum(-1), count), threshold=threshold, strict=True)


def llada2_decode(
    logits_fn: LogitsFn,
    prompt_ids: Tensor,
    gen_length: int,
    block_length: int,
    steps: int,
    mask_id: int,
    temperature: float = 0.0,
    threshold: float = 0.95,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    record_topk: bool = False,
    record_states: bool = False,
) -> DecodeTrace:
    """LLaDA2's sampler (see the module docstring); ``steps`` is the budget per block, as released.

    logits_fn(x, attention_mask=M) with M the (1, 1, seq, seq) bool block-causal mask. prompt_ids:
    (batch, prompt_len) without padding, prompt_len and gen_length multiples of block_length.
    """
    check_prompt(prompt_ids, mask_id, None, 0)
    for value, name in ((gen_length, "gen_length"), (block_length, "block_length"), (steps, "steps")):
        check_positive_int(value, name)
    check_nonneg(temperature, "temperature")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    prompt_len = prompt_ids.shape[1]
    if prompt_len % block_length or gen_length % block_length:
        raise ValueError(f"prompt length ({prompt_len}) and gen_length ({gen_length}) must be multiples of "
                         f"block_length ({block_length}): LLaDA2 attends in blocks from position 0")
    x, _ = canvas(prompt_ids, gen_length, mask_id, None)  # (batch, prompt + gen)
    gen = x[:, prompt_len:]  # view: writes land in x
    attn = block_diffusion_mask(x.shape[1], block_length, x.device)
    counts = llada_transfer_counts(torch.tensor([block_length]), steps)[0].tolist()  # (steps,)
    rec = Recorder(x, gen_length, record_topk, record_states)
    for block in range(gen_length // block_length):
        lo, hi = block * block_length, (block + 1) * block_length
        for j in range(steps):
            masked = gen[:, lo:hi].eq(mask_id)  # (batch, block)
            if bool(masked.any()):
                logits = forbid_mask(predict_window(logits_fn, x, attn, prompt_len, 0), mask_id)  # (b, gen, V)
            rec.observe(x, logits)  # a filled block's unused slot repeats the last reading of the same state
            if not bool(masked.any()):
                continue
            x0, p = _propose(logits[:, lo:hi], temperature, top_k, top_p, generator)
            chosen_blk = _threshold_choose(p, masked, counts[j], threshold)
            chosen = torch.zeros_like(gen, dtype=torch.bool)
            chosen[:, lo:hi] = chosen_blk
            rec.commit(block * steps + j, chosen, logits)
            gen[:, lo:hi] = torch.where(chosen_blk, x0, gen[:, lo:hi])
    return rec.finish(
        x, prompt_len=prompt_len, gen_len=gen_length, steps=steps * (gen_length // block_length),
        block_length=block_length, mask_id=mask_id, logit_shift=0, policy=f"llada2/threshold{threshold:g}",
    )
