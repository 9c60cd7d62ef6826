"""Text in, text out: run a diffusion LM (LLaDA or Dream) with the tracing samplers.

``generate(model, tokenizer, "prompt")`` tokenises (left-padding a batch), reads the mask id and
logit shift from the model's architecture adapter (`optimum_fair.arch`), decodes under
``torch.no_grad()`` and returns the answers.
Apply a chat template to the prompts first if the model expects one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..arch import get_adapter
from ..devices import execution_device
from ..enums import Algorithm, CacheMode, DreamAlg, Remasking, coerce_enum
from ..modeling.kv_cache import ApproximateCache, check_cache_mode
from ..scoring.block_sampler import llada2_decode
from ..scoring.checks import check_positive_int
from ..scoring.sampler import dream_decode, llada_decode
from ..scoring.trace import DecodeTrace


def _decode_facts(model: Any, mask_id: int | None) -> tuple[int, int]:
    """(mask id, logit shift) from the model's architecture adapter; ``mask_id`` overrides the id."""
    adapter = get_adapter(model)
    if mask_id is None:
        mask_id = adapter.mask_id(model.config)
    return mask_id, adapter.logit_shift


def _pad_id(tokenizer: Any) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    raise ValueError("tokenizer needs a pad_token_id or eos_token_id to left-pad a batch of prompts")


def encode_prompts(tokenizer: Any, prompts: list[str], device: torch.device) -> tuple[Tensor, Tensor | None]:
    """Tokenise and left-pad. Returns ids (batch, prompt_len) and a 0/1 mask of that shape, or None
    when every prompt has the same length (no padding)."""
    encoded = [list(tokenizer(p)["input_ids"]) for p in prompts]
    width = max(len(ids) for ids in encoded)
    if all(len(ids) == width for ids in encoded):
        return torch.tensor(encoded, dtype=torch.long, device=device), None
    pad = _pad_id(tokenizer)
    ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, seq in enumerate(encoded):
        if seq:
            ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq) :] = 1
    return ids.to(device), mask.to(device)


def _check_prompts(prompt: object) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompt must be a str or a non-empty list of str")
    return prompts


def generate(
    model: Any,
    tokenizer: Any,
    prompt: str | list[str],
    gen_length: int = 64,
    steps: int | None = None,
    block_length: int | None = None,
    algorithm: Algorithm | str = Algorithm.LLADA,
    remasking: Remasking | str = Remasking.LOW_CONFIDENCE,
    alg: DreamAlg | str = DreamAlg.ENTROPY,
    temperature: float = 0.0,
    mask_id: int | None = None,
    return_trace: bool = False,
    threshold: float | None = None,
    factor: float | None = None,
    cache: CacheMode | str = CacheMode.NONE,
    **sampler_kwargs: Any,
) -> str | list[str] | tuple[str | list[str], DecodeTrace]:
    """Generate ``gen_length`` tokens after each prompt.

    Args:
        model: callable as ``model(ids, attention_mask=...)`` returning an object with ``.logits``;
            its architecture adapter (`optimum_fair.arch`) gives the mask id (override with
            ``mask_id``) and the logit shift.
        steps: forward passes; default ``gen_length`` (one token per step).
        block_length: LLaDA / LLaDA2 block length; default min(32, gen_length). Ignored by Dream.
        algorithm: "llada", "dream" or "llada2" (block-causal attention; ``steps`` is then the budget per
            block, default block_length; the prompts must share one length, a multiple of block_length).
        remasking: LLaDA's commit rule; alg: Dream's (default ``entropy``, as in Dream's examples).
        threshold / factor: Fast-dLLM's parallel decoding: also commit every masked position of the block whose
            proposal has probability >= threshold (in (0, 1]), or the factor rule's count (see `llada_decode`;
            Dream needs ``alg="maskgit_plus"``; ``llada2`` takes ``threshold`` only, its own rule).
        cache: Fast-dLLM's approximate KV cache, ``none``, ``prefix`` or ``dual`` (LLaDA, Dream, LLaDA-MoE;
            not with ``llada2`` or classifier-free guidance).
        sampler_kwargs: passed on to `llada_decode` (``cfg_scale``, ``generator``, ``record_topk``,
            ...) or `dream_decode` (``top_p``, ``top_k``, ``alg_temp``, ``eps``, ``generator``, ...).
    Returns:
        The decoded answers (a str for a str prompt), and the `DecodeTrace` if ``return_trace``.
    """
    prompts = _check_prompts(prompt)
    check_positive_int(gen_length, "gen_length")
    algorithm = coerce_enum(Algorithm, algorithm, "algorithm")
    approx = _approximate_cache(model, cache, algorithm)
    if algorithm is Algorithm.LLADA2:
        if factor is not None:
            raise ValueError("factor: algorithm='llada2' runs LLaDA2's own threshold rule; give threshold instead")
        if threshold is not None:
            sampler_kwargs["threshold"] = threshold
    else:
        sampler_kwargs.update(threshold=threshold, factor=factor, cache=approx)
    mask_id, logit_shift = _decode_facts(model, mask_id)
    steps_given = steps
    steps = gen_length if steps is None else steps
    ids, attention_mask = encode_prompts(tokenizer, prompts, execution_device(model))

    def logits_fn(x: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        out = model(x) if attention_mask is None else model(x, attention_mask=attention_mask)
        return out.logits

    common = dict(mask_id=mask_id, temperature=temperature, attention_mask=attention_mask,
                  logit_shift=logit_shift, **sampler_kwargs)
    with torch.no_grad():
        if algorithm is Algorithm.LLADA:
            block = min(32, gen_length) if block_length is None else block_length
            trace = llada_decode(logits_fn, ids, gen_length, block, steps, remasking=remasking, **common)
        elif algorithm is Algorithm.LLADA2:
            trace = _llada2(logits_fn, ids, attention_mask, gen_length, steps_given, block_length, mask_id,
                            temperature, sampler_kwargs)
        else:
            trace = dream_decode(logits_fn, ids, gen_length, steps, alg=alg, **common)
    texts = [tokenizer.decode(row.tolist(), skip_special_tokens=True) for row in trace.generated.cpu()]
    answer: str | list[str] = texts[0] if isinstance(prompt, str) else texts
    return (answer, trace) if return_trace else answer


def _approximate_cache(model: Any, cache: CacheMode | str, algorithm: Algorithm) -> ApproximateCache | None:
    """The model behind its approximate KV cache for ``cache`` != none; refused by name where it cannot run."""
    mode = coerce_enum(CacheMode, cache, "cache")
    if mode is CacheMode.NONE:
        return None
    if algorithm is Algorithm.LLADA2:
        raise ValueError(f"cache={mode.value!r}: algorithm='llada2' decodes block-causally without an approximate "
                         "KV cache")
    check_cache_mode(model, mode.value)
    return ApproximateCache(model, mode.value)


def _llada2(logits_fn, ids, attention_mask, gen_length, steps, block_length, mask_id, temperature, kw):
    """`llada2_decode` for `generate`: prompts without padding, steps per block (default block_length)."""
    if attention_mask is not None and not bool(attention_mask.bool().all()):
        raise ValueError("algorithm='llada2' decodes prompts without padding: pass prompts of one token length")
    block = min(32, gen_length) if block_length is None else block_length
    return llada2_decode(logits_fn, ids, gen_length, block, block if steps is None else steps, mask_id,
                         temperature=temperature, **kw)
