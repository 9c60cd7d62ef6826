"""generate_until for the lm-eval backend: a task's generation_kwargs -> one `GenPlan`, a batch of prompts ->
this package's LLaDA / Dream samplers -> answers cut at the stop sequences. No lm-eval import here.

A task's ``generation_kwargs`` may set ``gen_length``, ``steps``, ``block_length``, ``algorithm``,
``remasking``, ``alg``, ``cfg``, ``temperature`` / ``do_sample``, ``top_p``, ``top_k``, ``threshold``,
``factor``, ``cache`` (Fast-dLLM's parallel rules and approximate KV cache) and ``until``; unset
ones come from model_args. ``max_gen_toks`` is ignored (a diffusion sampler decodes a fixed ``gen_length``,
as in the released wrappers). Any other key raises.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..enums import Algorithm, CacheMode, DreamAlg, Remasking, coerce_enum
from ..modeling.kv_cache import ApproximateCache
from ..scoring.checks import check_parallel_rule
from ..scoring.sampler import dream_decode, llada_decode

_KNOWN = {"until", "max_gen_toks", "do_sample", "temperature", "top_p", "top_k", "gen_length", "steps",
          "block_length", "cfg", "remasking", "alg", "algorithm", "threshold", "factor", "cache"}


@dataclass(frozen=True)
class GenPlan:
    """The settings of one generation batch (requests with equal plans share a batch)."""

    algorithm: Algorithm
    gen_length: int
    steps: int
    block_length: int
    remasking: Remasking
    alg: DreamAlg
    temperature: float
    cfg: float
    top_p: float | None
    top_k: int | None
    until: tuple[str, ...]
    threshold: float | None = None
    factor: float | None = None
    cache: CacheMode = CacheMode.NONE


def generation_plan(lm: Any, gen_kwargs: dict[str, Any] | None) -> GenPlan:
    """The `GenPlan` of one request: its task's generation_kwargs over ``lm.settings`` (model_args)."""
    kw = dict(gen_kwargs or {})
    unknown = sorted(set(kw) - _KNOWN)
    if unknown:
        raise ValueError(f"generation_kwargs {unknown} are not understood by the optimum-fair backend; "
                         f"known: {sorted(_KNOWN)}")
    s = lm.settings
    until = kw.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    eos = getattr(lm.tokenizer, "eos_token", None)
    if eos and eos not in until:
        until.append(eos)
    gen_length = kw.get("gen_length", s.gen_length)
    temperature = float(kw.get("temperature", s.temperature))
    if kw.get("do_sample") is False:
        temperature = 0.0
    threshold, factor = kw.get("threshold", s.threshold), kw.get("factor", s.factor)
    check_parallel_rule(threshold, factor)
    return GenPlan(
        algorithm=coerce_enum(Algorithm, kw.get("algorithm", s.algorithm or lm.adapter.sampler), "algorithm"),
        gen_length=gen_length,
        steps=kw.get("steps", s.steps or gen_length),
        block_length=kw.get("block_length", s.block_length or gen_length),
        remasking=coerce_enum(Remasking, kw.get("remasking", s.remasking), "remasking"),
        alg=coerce_enum(DreamAlg, kw.get("alg", s.alg), "alg"),
        temperature=temperature,
        cfg=float(kw.get("cfg", s.cfg)),
        top_p=kw.get("top_p"),
        top_k=kw.get("top_k"),
        until=tuple(until),
        threshold=threshold,
        factor=factor,
        cache=coerce_enum(CacheMode, kw.get("cache", s.cache), "cache"),
    )


def left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(batch, width) ids left-padded with pad_id, and a 0/1 mask of that shape (None: no padding)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    if bool(mask.all()):
        return ids.to(device), None
    return ids.to(device), mask.to(device)


def cut_at_stops(text: str, until: tuple[str, ...], specials: list[str]) -> str:
    """The text before the earliest stop sequence, with special-token strings removed."""
    hits = [text.find(stop) for stop in until if stop and stop in text]
    if hits:
        text = text[: min(hits)]
    for token in specials:
        text = text.replace(token, "")
    return text


def _prompts(lm: Any, contexts: list[str], gen_length: int) -> list[list[int]]:
    """Token prompts cut from the left so prompt + gen_length fits lm.max_length."""
    room = lm.max_length - gen_length
    if room < 1:
        raise ValueError(f"gen_length={gen_length} leaves no room for a prompt in max_length={lm.max_length}")
    prompts = []
    for context in contexts:
        tokens = lm.tok_encode(context) or [lm.prefix_token_id]
        if len(tokens) > room:
            tokens = tokens[-room:]
            lm._truncated += 1
        prompts.append(tokens)
    return prompts


def generate_batch(lm: Any, contexts: list[str], plan: GenPlan) -> list[str]:
    """Decode ``plan.gen_length`` tokens after each context in one batch; answers cut at the stops."""
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else lm.prefix_token_id
    ids, mask = left_pad(_prompts(lm, contexts, plan.gen_length), pad, lm.device)

    def logits_fn(x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return (lm.model(x) if attention_mask is None else lm.model(x, attention_mask=attention_mask)).logits

    generator = torch.Generator(device=lm.device).manual_seed(lm.settings.seed) if plan.temperature > 0 else None
    cache = None if plan.cache is CacheMode.NONE else ApproximateCache(lm.model, plan.cache.value)
    common = dict(mask_id=lm.mask_id, temperature=plan.temperature, attention_mask=mask, generator=generator,
                  logit_shift=lm.adapter.logit_shift, threshold=plan.threshold, factor=plan.factor, cache=cache)
    with torch.no_grad():
        if plan.algorithm is Algorithm.LLADA:
            trace = llada_decode(logits_fn, ids, plan.gen_length, plan.block_length, plan.steps,
                                 remasking=plan.remasking, cfg_scale=plan.cfg, **common)
        elif plan.algorithm is Algorithm.DREAM:
            trace = dream_decode(logits_fn, ids, plan.gen_length, plan.steps, alg=plan.alg, top_p=plan.top_p,
                                 top_k=plan.top_k, **common)
        else:  # left-padded batches need a padding-aware block mask
            raise ValueError(f"algorithm={plan.algorithm.value!r} is not available through the lm-eval backend "
                             "yet: use algorithm='llada' in model_args, or optimum_fair.generate")
    specials = list(getattr(lm.tokenizer, "all_special_tokens", []))
    return [cut_at_stops(lm.tokenizer.decode(row, skip_special_tokens=False), plan.until, specials)
            for row in trace.generated.cpu().tolist()]
