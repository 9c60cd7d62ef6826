"""Calling a model's ``logits_fn`` and lining its output up with the generation window."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from torch import Tensor

LogitsFn = Callable[..., Tensor]
"""``logits_fn(x) -> (batch, seq, vocab)``; called as ``logits_fn(x, attention_mask=m)`` when a
padding mask m (batch, seq) is in use."""


class CachedLogits(Protocol):
    """A model behind an approximate KV cache (Fast-dLLM); `modeling.kv_cache.ApproximateCache` is one.

    ``mode``: ``"prefix"`` (a step recomputes the current block and everything after it) or ``"dual"``
    (the current block only; the suffix's keys / values are read from the cache too)."""

    mode: str

    def refresh(self, x: Tensor, attention_mask: Tensor | None) -> Tensor:
        """Full forward of x (batch, seq) -> (batch, seq, vocab); caches every position's keys / values."""
        ...

    def window(self, x: Tensor, attention_mask: Tensor | None, start: int, end: int) -> Tensor:
        """Forward of x[:, start:end] attending to the cache elsewhere -> (batch, end - start, vocab)."""
        ...


def cached_block_logits(cache: CachedLogits, x: Tensor, attention_mask: Tensor | None, lo: int, hi: int,
                        logit_shift: int, refresh: bool) -> Tensor:
    """(batch, hi - lo, vocab) predictions for canvas positions [lo, hi) through an approximate KV cache.

    ``refresh`` (a block's first step) runs the exact full forward and refills the cache. Otherwise the
    forward covers [lo - shift, seq) (prefix) or [lo - shift, hi) (dual): the shifted reading of position lo
    needs position lo - 1, and every position of the block is recomputed."""
    start = lo - logit_shift
    if refresh:
        return cache.refresh(x, attention_mask)[:, start:hi - logit_shift]
    end = x.shape[1] if cache.mode == "prefix" else hi
    return cache.window(x, attention_mask, start, end)[:, : hi - lo]


def call_logits(logits_fn: LogitsFn, x: Tensor, attention_mask: Tensor | None) -> Tensor:
    """Run ``logits_fn`` on token ids x: (batch, seq) and check it returned (batch, seq, vocab)."""
    logits = logits_fn(x) if attention_mask is None else logits_fn(x, attention_mask=attention_mask)
    if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(x.shape):
        raise ValueError(
            f"logits_fn must return (batch, seq, vocab) = ({x.shape[0]}, {x.shape[1]}, vocab), "
            f"got {tuple(logits.shape)}"
        )
    return logits


def window_logits(logits: Tensor, prompt_len: int, gen_len: int, logit_shift: int) -> Tensor:
    """(batch, seq, vocab) -> (batch, gen_len, vocab): the prediction for each generated position.

    With ``logit_shift = 1`` (Dream) the prediction for position i sits at ``logits[:, i - 1]``.
    Returns a view.
    """
    start = prompt_len - logit_shift
    return logits[:, start : start + gen_len]


def predict_window(
    logits_fn: LogitsFn, x: Tensor, attention_mask: Tensor | None, prompt_len: int, logit_shift: int
) -> Tensor:
    """(batch, prompt_len + gen_len) ids -> (batch, gen_len, vocab) aligned predictions."""
    gen_len = x.shape[1] - prompt_len
    return window_logits(call_logits(logits_fn, x, attention_mask), prompt_len, gen_len, logit_shift)


def forbid_mask(logits: Tensor, mask_id: int) -> Tensor:
    """Copy of logits: (..., vocab) whose mask-token logit is -inf, so it is never predicted."""
    if not 0 <= mask_id < logits.shape[-1]:
        raise ValueError(f"mask_id ({mask_id}) must be a token id below the vocab size ({logits.shape[-1]})")
    out = logits.clone()
    out[..., mask_id] = float("-inf")
    return out
