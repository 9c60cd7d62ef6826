"""Monte-Carlo log-likelihood of a continuation under a masked diffusion LM (the core of the lm-eval backend).

A masked diffusion LM bounds the log-likelihood of a target x (L tokens after a visible prompt) by

    log p(x | prompt) >= -E[ w * sum over masked j of CE_j ],

CE_j = -log p(x_j | prompt, x with the masked tokens replaced by the mask token), w = 1 / mask ratio. The
estimate averages the bracket over ``mc_num`` random masks drawn ``batch_size`` at a time (one forward per
batch) and returns minus that mean. Two mask samplers (`LikelihoodEstimator`), as the released lm-eval
wrappers draw them; the architecture adapter names each family's (`arch.ModelAdapter.likelihood`):

* ``llada`` (LLaDA's ``eval_llada.py``): the number of masked target tokens is uniform on 1..L and stratified
  over a batch: for one uniform k0, row i masks k_i = ((k0 - 1 + round(i L / b)) mod L) + 1 tokens, a uniform
  random k_i-subset; w = L / k_i. The release rounds i L / b half-to-even (``torch.round``), which makes some
  rows' k_i non-uniform when i L / b ends in .5; here it rounds half up, so every row's k_i is exactly uniform.
* ``dream`` (Dream's ``eval.py``): for one uniform u, row i has t_i = (u + i / b) mod 1 and mask rate
  p_i = eps + (1 - eps) t_i; each target token is masked independently with probability p_i; w = 1 / p_i.

Every row's marginal law is the unstratified one, so the mean is unbiased for the same expectation at any
``batch_size`` and ``mc_num`` (checked against exact enumeration in ``tests/eval/test_likelihood.py``). Only
target positions are ever masked: the prompt and an optional visible suffix stay. With ``cfg`` > 0 a copy with
the prompt masked runs in the same forward and logits = un + (cfg + 1)(cond - un) (LLaDA's convention; Dream's
wrapper calls the same guidance cfg + 1). ``logit_shift`` = 1: position i is predicted by logits[:, i - 1].
Masks come from a CPU ``torch.Generator``, so a seed gives the same masks on every device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..enums import LikelihoodEstimator, coerce_enum
from ..scoring.checks import check_nonneg, check_positive_int
from ..scoring.forward import LogitsFn, call_logits, window_logits


@dataclass(frozen=True)
class MaskDraw:
    """One batch of masks over the target: masked (batch, target_len) bool, weight (batch,) float64."""

    masked: Tensor
    weight: Tensor


def check_mc_settings(mc_num: object, batch_size: object, cfg: object = 0.0, eps: object = 1e-3) -> None:
    """mc_num and batch_size positive ints with mc_num a multiple of batch_size; cfg >= 0; 0 < eps < 1."""
    check_positive_int(mc_num, "mc_num")
    check_positive_int(batch_size, "batch_size")
    if mc_num % batch_size:
        raise ValueError(f"mc_num ({mc_num}) must be a multiple of batch_size ({batch_size}): the estimate "
                         "averages mc_num / batch_size batches of batch_size draws")
    check_nonneg(cfg, "cfg")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
        raise ValueError(f"sampling_eps must be in (0, 1), got {eps!r}")


def stratified_counts(target_len: int, batch: int, k0: int) -> Tensor:
    """(batch,) mask counts in 1..target_len for one draw k0 in 1..target_len (LLaDA's stratification).

    Row i adds round(i L / b) (halves up, in integers) to k0 and wraps into 1..L, so as k0 runs over
    1..L every row runs over 1..L once: each row's count is exactly uniform.
    """
    i = torch.arange(batch)
    offset = (2 * i * target_len + batch) // (2 * batch)  # round(i * L / b), .5 rounded up
    return (k0 - 1 + offset) % target_len + 1


def llada_masks(target_len: int, batch: int, generator: torch.Generator | None) -> MaskDraw:
    """k_i of the target positions masked (stratified counts), a uniform random subset per row."""
    k0 = int(torch.randint(1, target_len + 1, (), generator=generator))
    counts = stratified_counts(target_len, batch, k0)  # (batch,)
    keys = torch.rand(batch, target_len, generator=generator)  # a random order of positions per row
    rank = keys.argsort(dim=1).argsort(dim=1)  # (batch, target_len): each position's place in that order
    masked = rank < counts[:, None]
    return MaskDraw(masked, target_len / counts.double())


def stratified_rates(batch: int, u: float, eps: float) -> Tensor:
    """(batch,) float64 mask rates eps + (1 - eps) * ((u + i / b) mod 1) (Dream's stratification)."""
    t = (u + torch.arange(batch, dtype=torch.float64) / batch) % 1.0
    return eps + (1.0 - eps) * t


def dream_masks(target_len: int, batch: int, generator: torch.Generator | None, eps: float) -> MaskDraw:
    """Each target token masked with probability p_i (stratified rates); weight 1 / p_i."""
    u = float(torch.rand((), dtype=torch.float64, generator=generator))
    rates = stratified_rates(batch, u, eps)  # (batch,)
    draws = torch.rand(batch, target_len, dtype=torch.float64, generator=generator)
    return MaskDraw(draws < rates[:, None], 1.0 / rates)


def draw_masks(estimator: LikelihoodEstimator | str, target_len: int, batch: int,
               generator: torch.Generator | None = None, eps: float = 1e-3) -> MaskDraw:
    """One batch of masks from the named sampler (see the module docstring)."""
    estimator = coerce_enum(LikelihoodEstimator, estimator, "estimator")
    if estimator is LikelihoodEstimator.LLADA:
        return llada_masks(target_len, batch, generator)
    return dream_masks(target_len, batch, generator, eps)


def guided_logits(logits_fn: LogitsFn, x: Tensor, prompt_len: int, cfg: float, mask_id: int) -> Tensor:
    """x: (batch, seq) -> (batch, seq, vocab); with cfg > 0, un + (cfg + 1)(cond - un), where the
    unconditional copy has the prompt masked. Both copies run as one batch."""
    if cfg <= 0:
        return call_logits(logits_fn, x, None)
    uncond = x.clone()
    uncond[:, :prompt_len] = mask_id
    cond, un = call_logits(logits_fn, torch.cat([x, uncond]), None).chunk(2, dim=0)
    return un + (cfg + 1.0) * (cond - un)


@torch.no_grad()
def draw_losses(logits_fn: LogitsFn, ids: Tensor, prompt_len: int, target_len: int, draw: MaskDraw,
                mask_id: int, logit_shift: int = 0, cfg: float = 0.0) -> Tensor:
    """(batch,) float64: weight * summed cross-entropy over the masked target tokens, one value per row.

    ids: (seq,) prompt, target, then any visible suffix; draw.masked: (batch, target_len) on any device.
    """
    batch = draw.masked.shape[0]
    masked = draw.masked.to(ids.device)
    target = ids[prompt_len : prompt_len + target_len]  # (target_len,)
    x = ids.expand(batch, -1).clone()  # (batch, seq)
    x[:, prompt_len : prompt_len + target_len] = torch.where(masked, mask_id, target)
    logits = guided_logits(logits_fn, x, prompt_len, cfg, mask_id)  # (batch, seq, vocab)
    pred = window_logits(logits, prompt_len, target_len, logit_shift).float()  # (batch, target_len, vocab)
    ce = F.cross_entropy(pred.transpose(1, 2), target.expand(batch, -1), reduction="none")  # (batch, target_len)
    summed = torch.where(masked, ce, torch.zeros_like(ce)).sum(dim=1).double().cpu()  # (batch,)
    return summed * draw.weight


def _check_request(ids: object, prompt_len: object, target_len: object, mask_id: object, logit_shift: int) -> None:
    if not isinstance(ids, Tensor) or ids.dim() != 1 or ids.dtype.is_floating_point:
        raise ValueError("ids must be a 1-D tensor of token ids (prompt, target, optional suffix)")
    check_positive_int(target_len, "target_len")
    if isinstance(prompt_len, bool) or not isinstance(prompt_len, int) or prompt_len < logit_shift:
        raise ValueError(f"prompt_len must be an int >= logit_shift ({logit_shift}), got {prompt_len!r}")
    if prompt_len + target_len > ids.shape[0]:
        raise ValueError(f"prompt_len + target_len ({prompt_len} + {target_len}) exceeds len(ids) ({ids.shape[0]})")
    if isinstance(mask_id, bool) or not isinstance(mask_id, int):
        raise ValueError(f"mask_id must be an int token id, got {mask_id!r}")
    if bool(ids.eq(mask_id).any()):
        raise ValueError(f"ids contain the mask token id {mask_id}: the text cannot be scored as a masked LM")


def mc_draws(logits_fn: LogitsFn, ids: Tensor, prompt_len: int, target_len: int, *, mask_id: int,
             mc_num: int = 128, batch_size: int = 32, estimator: LikelihoodEstimator | str = "llada",
             cfg: float = 0.0, logit_shift: int = 0, eps: float = 1e-3,
             generator: torch.Generator | None = None) -> Tensor:
    """(mc_num,) float64 per-draw values w * sum CE, in draw order (rows of one batch are consecutive).

    The log-likelihood estimate is minus their mean (`mc_loglikelihood`); the batches of ``batch_size``
    consecutive draws are independent, the rows within one are stratified.
    """
    check_mc_settings(mc_num, batch_size, cfg, eps)
    _check_request(ids, prompt_len, target_len, mask_id, logit_shift)
    out = []
    for _ in range(mc_num // batch_size):
        draw = draw_masks(estimator, target_len, batch_size, generator, eps)
        out.append(draw_losses(logits_fn, ids, prompt_len, target_len, draw, mask_id, logit_shift, cfg))
    return torch.cat(out)


def mc_loglikelihood(logits_fn: LogitsFn, ids: Tensor, prompt_len: int, target_len: int, **kwargs) -> float:
    """The Monte-Carlo log-likelihood estimate of ``ids[prompt_len : prompt_len + target_len]`` given the
    rest of ``ids`` (keyword arguments as in `mc_draws`)."""
    return -float(mc_draws(logits_fn, ids, prompt_len, target_len, **kwargs).mean())


def greedy_matches(logits_fn: LogitsFn, ids: Tensor, prompt_len: int, target_len: int, *, mask_id: int,
                   logit_shift: int = 0, cfg: float = 0.0) -> bool:
    """LLaDA's suffix greedy check: from a fully masked target, commit one token per forward (the most
    confident argmax among the masked positions); True when the result is the target."""
    _check_request(ids, prompt_len, target_len, mask_id, logit_shift)
    target = ids[prompt_len : prompt_len + target_len]
    x = ids.clone()[None]  # (1, seq)
    x[0, prompt_len : prompt_len + target_len] = mask_id
    with torch.no_grad():
        for _ in range(target_len):
            masked = x[0, prompt_len : prompt_len + target_len].eq(mask_id)  # (target_len,)
            logits = guided_logits(logits_fn, x, prompt_len, cfg, mask_id)  # (1, seq, vocab)
            probs = window_logits(logits, prompt_len, target_len, logit_shift)[0].float().softmax(-1)
            conf, token = probs.max(-1)  # (target_len,) each
            j = int(conf.masked_fill(~masked, -1.0).argmax())
            x[0, prompt_len + j] = token[j]
    return bool(torch.equal(x[0, prompt_len : prompt_len + target_len], target))
