"""Argument checks for the samplers; every one runs before the first forward pass."""

from __future__ import annotations

import torch
from torch import Tensor


def check_prompt(prompt_ids: object, mask_id: object, attention_mask: object, logit_shift: object) -> None:
    """Validate the prompt batch, the mask id, the padding mask and the logit shift."""
    if mask_id is None or isinstance(mask_id, bool) or not isinstance(mask_id, int):
        raise ValueError(f"mask_id must be an int token id, got {mask_id!r}")
    if not isinstance(prompt_ids, Tensor) or prompt_ids.dim() != 2 or prompt_ids.shape[0] == 0:
        raise ValueError("prompt_ids must be a (batch, prompt_len) tensor with batch >= 1")
    if prompt_ids.dtype.is_floating_point or prompt_ids.dtype.is_complex or prompt_ids.dtype == torch.bool:
        raise ValueError(f"prompt_ids must hold integer token ids, got dtype {prompt_ids.dtype}")
    if logit_shift not in (0, 1):
        raise ValueError(f"logit_shift must be 0 or 1, got {logit_shift!r}")
    if prompt_ids.shape[1] < logit_shift:
        raise ValueError(f"prompt_ids needs at least logit_shift={logit_shift} positions")
    real = torch.ones_like(prompt_ids, dtype=torch.bool)
    if attention_mask is not None:
        if not isinstance(attention_mask, Tensor) or attention_mask.shape != prompt_ids.shape:
            raise ValueError(f"attention_mask must be a tensor of shape {tuple(prompt_ids.shape)}")
        if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise ValueError("attention_mask must hold only 0 and 1")
        real = attention_mask.bool()
    if bool((prompt_ids.eq(mask_id) & real).any()):
        raise ValueError(f"prompt_ids contains the mask token id {mask_id}")


def check_positive_int(value: object, name: str) -> None:
    """Raise ValueError unless ``value`` is an int >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_nonneg(value: object, name: str) -> None:
    """Raise ValueError unless ``value`` is a real number >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")


def check_llada_schedule(gen_length: object, block_length: object, steps: object) -> None:
    """Blocks must tile the answer, steps must split evenly over blocks, every step commits >= 1."""
    check_positive_int(gen_length, "gen_length")
    check_positive_int(block_length, "block_length")
    check_positive_int(steps, "steps")
    if gen_length % block_length:
        raise ValueError(f"gen_length ({gen_length}) must be a multiple of block_length ({block_length})")
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise ValueError(f"steps ({steps}) must be a multiple of the number of blocks ({num_blocks})")
    if steps > gen_length:
        raise ValueError(f"steps ({steps}) must be <= gen_length ({gen_length}): a step would commit nothing")


def check_dream_sampling(top_p: object, top_k: object, alg_temp: object, eps: object) -> None:
    """Check Dream's token filters and time schedule."""
    bad_type = isinstance(top_p, bool) or not isinstance(top_p, (int, float))
    if top_p is not None and (bad_type or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be None or in (0, 1], got {top_p!r}")
    if top_k is not None:
        check_positive_int(top_k, "top_k")
    if alg_temp is not None:
        check_nonneg(alg_temp, "alg_temp")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
        raise ValueError(f"eps must be in (0, 1), got {eps!r}")


def check_parallel_rule(threshold: object, factor: object) -> None:
    """Threshold decoding needs a threshold in (0, 1], the factor rule a factor > 0; not both at once."""
    if threshold is not None and factor is not None:
        raise ValueError(f"threshold ({threshold!r}) and factor ({factor!r}) are two commit rules: give one")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                  or not 0 < threshold <= 1):
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
    if factor is not None and (isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0):
        raise ValueError(f"factor must be a number > 0, got {factor!r}")


def check_cache(cache: object, cfg_scale: float, record_topk: bool) -> None:
    """An approximate KV cache (`forward.CachedLogits`) runs one conditional pass and reads the block only."""
    if cache is None:
        return
    if getattr(cache, "mode", None) not in ("prefix", "dual"):
        raise ValueError(f"cache must be a CachedLogits whose mode is 'prefix' or 'dual', got {cache!r}")
    if cfg_scale > 0:
        raise ValueError("cache: classifier-free guidance (cfg_scale > 0) is not run through a KV cache")
    if record_topk:
        raise ValueError("cache: record_topk reads every position at every step; a cached step reads the block only")
