"""Fast-dLLM's approximate KV cache for the native LLaDA, Dream and LLaDA-MoE models, on transformers' cache
objects.

A masked-diffusion model attends bidirectionally, so no key / value is exact once any token changes; Fast-dLLM
reuses them anyway while a block is decoded. Here that takes two model-level rules, both through a
`transformers.DynamicCache` passed as ``past_key_values``:

* an empty cache (or no ``cache_position``) is filled the usual way (`DynamicCache.update` appends): a full
  forward with ``use_cache=True`` caches every position's keys / values (a *refresh*), and its logits are
  those of the plain forward, bit for bit;
* a forward of a window ``x[:, start:end]`` with ``cache_position = arange(start, end)`` writes the window's
  fresh keys / values over the cached ones at those positions and attends over the whole cached sequence:
  the window sees stale keys / values everywhere else.

A sampler asks for [block start, seq) after a refresh (*prefix* cache: the prompt and finished blocks are
stale, the block and the masked suffix recomputed) or [block start, block end) (*dual* cache: the suffix is
stale too), and refreshes when a block completes. `ApproximateCache` wraps a model into the sampler's
`scoring.forward.CachedLogits`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformers import DynamicCache

__all__ = ["CACHE_MODES", "ApproximateCache", "cached_kv", "check_cache_mode", "key_length",
           "supports_approximate_cache"]

CACHE_MODES = ("prefix", "dual")


def key_length(cache: Any, layer_idx: int, seq: int, cache_position: Tensor | None) -> int:
    """How many keys a layer's queries attend to: the cached length when a window is written in place,
    else the cached length plus the ``seq`` new positions (an empty cache: ``seq``)."""
    if cache is None:
        return seq
    cached = cache.get_seq_length(layer_idx)
    return cached if cache_position is not None and cached > 0 else cached + seq


def cached_kv(cache: Any, layer_idx: int, k: Tensor, v: Tensor, cache_position: Tensor | None
              ) -> tuple[Tensor, Tensor]:
    """Keys and values a layer attends to, each (batch, kv_heads, keys, head_dim).

    k, v: (batch, kv_heads, seq, head_dim) of the current input, already rotated. No cache: (k, v). An empty
    layer or no ``cache_position``: `DynamicCache.update` (appends). Otherwise the window's k / v overwrite
    the cached ones at ``cache_position`` (seq,) and the whole cached sequence is returned."""
    if cache is None:
        return k, v
    if cache_position is None or cache.get_seq_length(layer_idx) == 0:
        return cache.update(k, v, layer_idx)
    layer = cache.layers[layer_idx]
    if int(cache_position.max()) >= layer.keys.shape[-2] or cache_position.shape[0] != k.shape[-2]:
        raise ValueError(f"cache_position must index the {layer.keys.shape[-2]} cached positions, one per input "
                         f"position ({k.shape[-2]}), got {cache_position.tolist()}")
    layer.keys[:, :, cache_position] = k.to(layer.keys.dtype)
    layer.values[:, :, cache_position] = v.to(layer.values.dtype)
    return layer.keys, layer.values


def supports_approximate_cache(model: Any) -> bool:
    """True for the native models whose layers read and write a `DynamicCache` (LLaDA, Dream, LLaDA-MoE)."""
    return bool(getattr(model, "_supports_approximate_cache", False))


def check_cache_mode(model: Any, mode: str) -> None:
    """Refuse a cache mode the model's family cannot run, naming the field ``cache``."""
    if mode not in CACHE_MODES:
        raise ValueError(f"cache must be one of {list(CACHE_MODES)} (or none), got {mode!r}")
    if not supports_approximate_cache(model):
        raise ValueError(f"cache={mode!r}: {type(model).__name__} has no approximate KV cache "
                         f"(LLaDA, Dream and LLaDA-MoE do; LLaDA2 decodes block-causally without one)")


class ApproximateCache:
    """A native dLLM behind Fast-dLLM's approximate KV cache: the samplers' `CachedLogits`.

    ``refresh(x, mask)`` runs the exact full forward and caches every position; ``window(x, mask, start, end)``
    runs ``x[:, start:end]`` at its absolute positions against the cache (see the module docstring). ``mask``
    is the (batch, seq) padding mask of the whole canvas or None. Logits come back on x's device.
    """

    def __init__(self, model: Any, mode: str) -> None:
        check_cache_mode(model, mode)
        self.model, self.mode = model, mode
        self.past: DynamicCache | None = None

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def refresh(self, x: Tensor, attention_mask: Tensor | None) -> Tensor:
        dev = self._device()
        self.past = DynamicCache()
        mask = None if attention_mask is None else attention_mask.to(dev)
        out = self.model(input_ids=x.to(dev), attention_mask=mask, past_key_values=self.past, use_cache=True)
        return out.logits.to(x.device)  # (batch, seq, vocab)

    def window(self, x: Tensor, attention_mask: Tensor | None, start: int, end: int) -> Tensor:
        if self.past is None or self.past.get_seq_length() != x.shape[1]:
            raise RuntimeError("ApproximateCache.window needs a refresh of the same canvas first")
        dev = self._device()
        pos = torch.arange(start, end, device=dev)  # (end - start,)
        mask = None if attention_mask is None else attention_mask.to(dev)
        out = self.model(input_ids=x[:, start:end].to(dev), attention_mask=mask, position_ids=pos,
                         past_key_values=self.past, cache_position=pos, use_cache=True)
        return out.logits.to(x.device)  # (batch, end - start, vocab)


def resolve_cache(past_key_values: Any, use_cache: bool | None, cache_position: Tensor | None,
                  position_ids: Tensor | None, seq: int, device: torch.device, cache: Any = None
                  ) -> tuple[Any, Tensor | None]:
    """The cache a forward uses (``cache``, transformers >= 5.25's name, or ``past_key_values``; with
    ``use_cache=True`` and neither: a new `DynamicCache`; else None) and its position ids: given ones win,
    else ``cache_position``, else the positions after the cached ones."""
    if cache is not None and past_key_values is not None:
        raise ValueError("cache / past_key_values: give one of them (the same argument, two names)")
    cache = cache if cache is not None else past_key_values
    cache = cache if cache is not None else (DynamicCache() if use_cache else None)
    if cache is None or position_ids is not None:
        return cache, position_ids
    if cache_position is not None:
        return cache, cache_position
    start = cache.get_seq_length()
    return cache, torch.arange(start, start + seq, device=device)


def lm_output(logits: Tensor, states: tuple[Tensor, ...] | None, cache: Any, return_dict: bool | None):
    """The LM forward's result: ``CausalLMOutput`` (``CausalLMOutputWithPast`` when a cache was used) or the
    tuple (logits[, hidden_states]) with ``return_dict=False``."""
    from transformers.modeling_outputs import CausalLMOutput, CausalLMOutputWithPast

    if return_dict is False:
        return (logits, states) if states is not None else (logits,)
    if cache is None:
        return CausalLMOutput(logits=logits, hidden_states=states)
    # transformers 5.25 renamed the field ``past_key_values`` to ``cache`` (the old name still reads it)
    name = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
    return CausalLMOutputWithPast(logits=logits, hidden_states=states, **{name: cache})
