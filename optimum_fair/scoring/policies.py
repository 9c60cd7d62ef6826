"""Commit rules shared by the samplers and the metrics: names, schedules, position selection.

Pure torch; every function works on a batch of generation windows, shapes noted per argument.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..enums import Confidence


def llada_transfer_counts(num_masked: Tensor, steps: int) -> Tensor:
    """Tokens to commit per step inside one block: an even split, remainder on the first steps.

    Args:
        num_masked: (batch,) masked positions in the block when the block starts.
        steps: steps spent on the block.
    Returns:
        (batch, steps) long; rows sum to ``num_masked``. Example: 8 masked, 3 steps -> [3, 3, 2].
    """
    base = num_masked.long() // steps  # (batch,)
    extra = num_masked.long() % steps  # (batch,)
    step_idx = torch.arange(steps, device=num_masked.device)  # (steps,)
    return base.unsqueeze(1) + (step_idx.unsqueeze(0) < extra.unsqueeze(1)).long()


def dream_timesteps(steps: int, eps: float, device: torch.device | str = "cpu") -> Tensor:
    """(steps + 1,) float32 linear times from 1 down to ``eps``, as Dream samples them."""
    return torch.linspace(1.0, eps, steps + 1, device=device)


def dream_transfer_counts(num_masked: Tensor, step: int, steps: int, timesteps: Tensor) -> Tensor:
    """(batch,) tokens to commit at ``step``: floor(masked * (1 - s/t)), everything at the last step."""
    if step == steps - 1:
        return num_masked.long()
    ratio = 1.0 - timesteps[step + 1] / timesteps[step]  # float32 scalar
    return (num_masked.float() * ratio).long()


def select_top(scores: Tensor, counts: Tensor) -> Tensor:
    """Pick the ``counts[b]`` highest-scoring eligible positions of each row.

    Args:
        scores: (batch, n) float; ineligible positions hold -inf and are never picked.
        counts: (batch,) long.
    Returns:
        (batch, n) bool. Ties go to the lower index.
    """
    order = scores.argsort(dim=-1, descending=True, stable=True)  # (batch, n)
    rank_of = torch.arange(scores.shape[-1], device=scores.device).expand_as(order)
    ranks = torch.empty_like(order).scatter_(-1, order, rank_of)  # (batch, n) rank of each position
    return (ranks < counts.unsqueeze(-1)) & (scores > float("-inf"))


def gumbel_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard Gumbel noise in float64 with the shape of ``x``."""
    u = torch.rand(x.shape, dtype=torch.float64, device=x.device, generator=generator)
    return -torch.log(-torch.log(u.clamp_min(torch.finfo(torch.float64).tiny)))


def select_sampled(scores: Tensor, counts: Tensor, temp: float, generator: torch.Generator | None) -> Tensor:
    """Draw ``counts[b]`` positions per row without replacement, with P proportional to
    softmax(scores / temp) (Gumbel-top-k; Dream's ``alg_temp`` position sampling).

    Args:
        scores: (batch, n); -inf marks ineligible positions.
        counts: (batch,) long.
    Returns:
        (batch, n) bool.
    """
    noisy = scores.double() / temp + gumbel_like(scores, generator)  # -inf stays -inf
    return select_top(noisy, counts)


def confidence_scores(probs: Tensor, kind: Confidence) -> Tensor:
    """(..., vocab) probabilities -> (...,) confidence of the given kind."""
    if kind is Confidence.PROB:
        return probs.max(-1).values
    if kind is Confidence.MARGIN:
        top = probs.topk(min(2, probs.shape[-1]), dim=-1).values  # (..., 2)
        return top[..., 0] - (top[..., 1] if top.shape[-1] > 1 else 0.0)
    return (probs * torch.log(probs + 1e-10)).sum(-1)


def filter_top_k(logits: Tensor, top_k: int | None) -> Tensor:
    """Keep the ``top_k`` largest logits along the last dim; the rest become -inf."""
    if top_k is None or top_k >= logits.shape[-1]:
        return logits
    kth = logits.topk(top_k, dim=-1).values[..., -1:]  # (..., 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: Tensor, top_p: float | None) -> Tensor:
    """Nucleus filtering: keep the smallest top set whose probability reaches ``top_p``."""
    if top_p is None or top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (..., vocab)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    drop_sorted = cum > top_p
    drop_sorted[..., 1:] = drop_sorted[..., :-1].clone()  # keep the token that crosses top_p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def rule_counts(conf: Tensor, threshold: float | None = None, factor: float | None = None,
                strict: bool = False) -> Tensor:
    """(batch,) how many of the most confident eligible positions a parallel-decoding rule commits.

    Args:
        conf: (batch, n) probability of each position's proposal; -inf marks ineligible positions.
        threshold: Fast-dLLM's threshold rule: count the positions with conf >= threshold (> with ``strict``,
            as LLaDA2's release).
        factor: Fast-dLLM's factor rule: the n most confident while every k <= n has
            (k + 1)(1 - c_(k)) <= factor, c_(k) the k-th largest conf; the first always passes.
    Returns:
        (batch,) long; 0 when neither rule is given. Example: conf [0.95, 0.7, 0.6], factor 1 ->
        k=1 passes, k=2: 3 * 0.3 = 0.9 <= 1 passes, k=3: 4 * 0.4 = 1.6 fails -> 2.
    """
    if threshold is not None:
        return (conf > threshold if strict else conf >= threshold).sum(-1)
    if factor is None:
        return torch.zeros(conf.shape[0], dtype=torch.long, device=conf.device)
    top = conf.sort(dim=-1, descending=True).values  # (batch, n)
    k = torch.arange(1, conf.shape[-1] + 1, device=conf.device, dtype=top.dtype)  # (n,)
    ok = (k + 1) * (1 - top) <= factor  # -inf confidence never passes
    ok[:, 0] = top[:, 0] > float("-inf")
    return ok.long().cumprod(-1).sum(-1)


def select_parallel(conf: Tensor, min_count: Tensor, threshold: float | None = None, factor: float | None = None,
                    strict: bool = False) -> Tensor:
    """(batch, n) bool: the max(min_count, rule count) most confident eligible positions of each row.

    The rule's positions are the most confident ones, so this is "every position the rule accepts, and at
    least the ``min_count`` (batch,) most confident". conf: (batch, n), -inf where ineligible; the count is
    capped by the eligible positions. With neither rule it is `select_top` (the fixed schedule)."""
    eligible = (conf > float("-inf")).sum(-1)  # (batch,)
    count = torch.minimum(torch.maximum(min_count.long(), rule_counts(conf, threshold, factor, strict)), eligible)
    return select_top(conf, count)
