"""Diffusion-LM samplers that keep their commit history: LLaDA's ``generate`` and Dream's
``diffusion_generate``, rewritten over a plain ``logits_fn`` and returning a `DecodeTrace`.

Both start from the prompt followed by ``gen_length`` mask tokens and run ``steps`` forward passes;
each step commits some masked positions, which are never revised afterwards. Unlike the reference
code, the mask token itself is never proposed (its logit is set to -inf before anything else, so
all recorded probabilities are over the other tokens): every commit is final and the answer holds
no mask token.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..enums import Confidence, DreamAlg, Remasking, coerce_enum
from .checks import (
    check_cache,
    check_dream_sampling,
    check_llada_schedule,
    check_nonneg,
    check_parallel_rule,
    check_positive_int,
    check_prompt,
)
from .forward import CachedLogits, LogitsFn, cached_block_logits, forbid_mask, predict_window
from .policies import (
    confidence_scores,
    dream_timesteps,
    dream_transfer_counts,
    filter_top_k,
    filter_top_p,
    gumbel_like,
    llada_transfer_counts,
    select_parallel,
    select_sampled,
    select_top,
)
from .trace import DecodeTrace


class Recorder:
    """Accumulates commit steps, commit margins and the optional per-step records."""

    def __init__(self, x: Tensor, gen_len: int, record_topk: bool, record_states: bool) -> None:
        batch = x.shape[0]
        self.commit_step = torch.full((batch, gen_len), -1, dtype=torch.long, device=x.device)
        self.commit_margin = torch.full((batch, gen_len), float("nan"), device=x.device)
        self.top1_token: list[Tensor] | None = [] if record_topk else None
        self.top1_prob: list[Tensor] | None = [] if record_topk else None
        self.states: list[Tensor] | None = [] if record_states else None

    def observe(self, x: Tensor, logits: Tensor | None) -> None:
        """Record the state x: (batch, seq) and the top-1 of logits: (batch, gen, vocab) (None: not recorded)."""
        if self.states is not None:
            self.states.append(x.clone())
        if self.top1_token is not None and self.top1_prob is not None and logits is not None:
            flat = logits.float()
            best, token = flat.max(-1)  # (batch, gen)
            self.top1_token.append(token)
            self.top1_prob.append(torch.exp(best - flat.logsumexp(-1)))

    def commit(self, step: int, chosen: Tensor, logits: Tensor) -> None:
        """Mark chosen: (batch, gen) bool as committed at ``step``; store their margins."""
        self.commit_block(step, 0, chosen, logits)

    def commit_block(self, step: int, lo: int, chosen_blk: Tensor, logits_blk: Tensor) -> None:
        """Commit for a block starting at generated position lo: chosen_blk (batch, block) bool, logits_blk
        (batch, block, vocab). Every commit of the step is recorded (parallel rules commit several)."""
        chosen = torch.zeros_like(self.commit_step, dtype=torch.bool)  # (batch, gen)
        chosen[:, lo : lo + chosen_blk.shape[1]] = chosen_blk
        self.commit_step[chosen] = step
        if bool(chosen_blk.any()):
            probs = logits_blk[chosen_blk].float().softmax(-1)  # (n_chosen, vocab), row-major like chosen
            self.commit_margin[chosen] = confidence_scores(probs, Confidence.MARGIN)

    def finish(self, x: Tensor, **meta: object) -> DecodeTrace:
        if bool((self.commit_step < 0).any()):
            raise RuntimeError("decode ended with uncommitted positions")
        def stack(xs):
            return None if xs is None else torch.stack(xs)

        return DecodeTrace(
            sequences=x,
            commit_step=self.commit_step,
            commit_margin=self.commit_margin,
            top1_token=stack(self.top1_token),
            top1_prob=stack(self.top1_prob),
            states=stack(self.states),
            **meta,
        )


def canvas(prompt_ids: Tensor, gen_length: int, mask_id: int, attention_mask: Tensor | None):
    """Prompt followed by masks, and the padding mask extended over the answer (ones)."""
    batch = prompt_ids.shape[0]
    tail = torch.full((batch, gen_length), mask_id, dtype=torch.long, device=prompt_ids.device)
    x = torch.cat([prompt_ids.long(), tail], dim=1)  # (batch, prompt + gen)
    if attention_mask is None:
        return x, None
    ones = torch.ones((batch, gen_length), dtype=attention_mask.dtype, device=attention_mask.device)
    return x, torch.cat([attention_mask, ones], dim=1)


def _guided_logits(
    logits_fn: LogitsFn,
    x: Tensor,
    mask: Tensor | None,
    prompt_len: int,
    shift: int,
    cfg_scale: float,
    mask_id: int,
) -> Tensor:
    """(batch, gen, vocab) predictions; with cfg_scale > 0, un + (scale + 1)(cond - un), where the
    unconditional pass sees the prompt masked out. Both passes run as one batch."""
    if cfg_scale <= 0:
        return predict_window(logits_fn, x, mask, prompt_len, shift)
    uncond = x.clone()
    uncond[:, :prompt_len] = mask_id
    both_mask = None if mask is None else torch.cat([mask, mask])
    both = predict_window(logits_fn, torch.cat([x, uncond]), both_mask, prompt_len, shift)
    cond, un = both.chunk(2, dim=0)  # each (batch, gen, vocab)
    return un + (cfg_scale + 1.0) * (cond - un)


def _llada_choose(
    logits: Tensor, masked: Tensor, count: Tensor, temperature: float, remasking: Remasking, generator,
    rule: tuple[float | None, float | None] = (None, None),
) -> tuple[Tensor, Tensor]:
    """One LLaDA step inside the current block.

    Args:
        logits: (batch, block, vocab) predictions for the block; masked: (batch, block) bool;
        count: (batch,) tokens to commit at least; rule: (threshold, factor), at most one set, adds every
            position the parallel rule accepts (`policies.select_parallel`).
    Returns:
        chosen: (batch, block) bool, x0: (batch, block) proposed tokens.
    """
    if temperature == 0:
        x0 = logits.argmax(-1)  # (batch, block); widening to float64 is exact, so the same argmax
    else:
        logits64 = logits.double()
        x0 = (logits64 + temperature * gumbel_like(logits64, generator)).argmax(-1)
    if remasking is Remasking.LOW_CONFIDENCE:
        rows = logits[masked].double()  # (n_masked, vocab): only masked positions are ranked
        chosen_logit = rows.gather(-1, x0[masked].unsqueeze(-1)).squeeze(-1)
        conf = torch.full(masked.shape, float("-inf"), dtype=torch.float64, device=masked.device)
        conf[masked] = torch.exp(chosen_logit - rows.logsumexp(-1))  # p(x0) where masked
    else:
        conf = torch.rand(masked.shape, dtype=torch.float64, device=masked.device, generator=generator)
        conf = conf.masked_fill(~masked, float("-inf"))
    return select_parallel(conf, count, *rule), x0


def _policy_name(base: str, threshold: float | None, factor: float | None, cache: CachedLogits | None) -> str:
    """e.g. ``llada/low_confidence+threshold0.9+prefix``: the sampler, its parallel rule and its cache."""
    rule = "" if threshold is None and factor is None else (
        f"+threshold{threshold:g}" if threshold is not None else f"+factor{factor:g}")
    return base + rule + ("" if cache is None else f"+{cache.mode}")


def _check_llada_parallel(remasking: Remasking, threshold, factor, cache, cfg_scale, record_topk) -> None:
    check_parallel_rule(threshold, factor)
    if (threshold is not None or factor is not None) and remasking is not Remasking.LOW_CONFIDENCE:
        raise ValueError("remasking: threshold / factor compare the proposal's probability; "
                         f"remasking={remasking.value!r} ranks at random")
    check_cache(cache, cfg_scale, record_topk)


def _llada_block_logits(logits_fn, cache, x, mask, prompt_len, lo, hi, shift, cfg, first):
    """Predictions for generated positions [lo, hi): (full (batch, gen, vocab) or None with a cache,
    block (batch, hi - lo, vocab)), the mask token forbidden."""
    if cache is None:
        full = forbid_mask(_guided_logits(logits_fn, x, mask, prompt_len, shift, cfg[0], cfg[1]), cfg[1])
        return full, full[:, lo:hi]
    blk = cached_block_logits(cache, x, mask, prompt_len + lo, prompt_len + hi, shift, refresh=first)
    return None, forbid_mask(blk, cfg[1])


def llada_decode(
    logits_fn: LogitsFn,
    prompt_ids: Tensor,
    gen_length: int,
    block_length: int,
    steps: int,
    mask_id: int,
    temperature: float = 0.0,
    remasking: Remasking | str = Remasking.LOW_CONFIDENCE,
    cfg_scale: float = 0.0,
    attention_mask: Tensor | None = None,
    generator: torch.Generator | None = None,
    logit_shift: int = 0,
    record_topk: bool = False,
    record_states: bool = False,
    threshold: float | None = None,
    factor: float | None = None,
    cache: CachedLogits | None = None,
) -> DecodeTrace:
    """LLaDA's semi-autoregressive sampler, with Fast-dLLM's parallel rules and approximate KV cache.

    The answer is cut into blocks of ``block_length`` decoded left to right, ``steps / num_blocks``
    steps each. At a block's start its masked count is split evenly over its steps (remainder on the
    first steps: 8 masks over 3 steps commit 3, 3, 2). At each step every position gets a proposal
    (argmax, or Gumbel-max at ``temperature`` > 0 with float64 noise) and the ``count`` masked
    positions of the block with the highest p(proposal) (``low_confidence``) or chosen uniformly at
    random (``random``, reproducible through ``generator``) are committed.

    Parallel decoding (``low_confidence`` only): with ``threshold`` in (0, 1], every masked position of the
    block with p(proposal) >= threshold is committed too; with ``factor`` > 0, the n most confident while
    (k + 1)(1 - p_(k)) <= factor for every k <= n (Fast-dLLM's factor rule). The schedule's count stays the
    minimum, so ``steps = gen_length`` gives Fast-dLLM's "at least one per step". A block that fills early
    ends; its unused step slots stay in the trace with no commit and no forward (as `llada2_decode`).

    ``cache`` (a `forward.CachedLogits`, e.g. `modeling.kv_cache.ApproximateCache`): each block's first
    step is the exact full forward and refills the cache; later steps recompute only the block and what
    follows it (``prefix``) or the block alone (``dual``). Not with classifier-free guidance or record_topk.

    Args:
        logits_fn: x (batch, seq) -> logits (batch, seq, vocab); receives ``attention_mask=`` when
            a padding mask is given.
        prompt_ids: (batch, prompt_len) left-padded prompt ids, without the mask token.
        attention_mask: (batch, prompt_len) 1 for tokens, 0 for padding; extended with ones.
        cfg_scale: classifier-free guidance strength (0 disables it).
        logit_shift: 1 if the prediction for position i is ``logits[:, i - 1]``.
        record_topk / record_states: keep per-step top-1 readings / states in the trace.
    """
    check_prompt(prompt_ids, mask_id, attention_mask, logit_shift)
    check_llada_schedule(gen_length, block_length, steps)
    check_nonneg(temperature, "temperature")
    check_nonneg(cfg_scale, "cfg_scale")
    remasking = coerce_enum(Remasking, remasking, "remasking")
    _check_llada_parallel(remasking, threshold, factor, cache, cfg_scale, record_topk)
    prompt_len = prompt_ids.shape[1]
    x, mask = canvas(prompt_ids, gen_length, mask_id, attention_mask)  # x: (batch, prompt + gen)
    gen = x[:, prompt_len:]  # view: writes land in x
    num_blocks = gen_length // block_length
    per_block = steps // num_blocks
    rec = Recorder(x, gen_length, record_topk, record_states)
    full = None
    for block in range(num_blocks):
        lo, hi = block * block_length, (block + 1) * block_length
        counts = llada_transfer_counts(gen[:, lo:hi].eq(mask_id).sum(-1), per_block)  # (batch, per_block)
        for j in range(per_block):
            masked = gen[:, lo:hi].eq(mask_id)  # (batch, block)
            if not bool(masked.any()):  # filled early by a parallel rule: an empty slot, no forward
                rec.observe(x, full)
                continue
            full, blk = _llada_block_logits(logits_fn, cache, x, mask, prompt_len, lo, hi, logit_shift,
                                            (cfg_scale, mask_id), first=j == 0)
            rec.observe(x, full)
            chosen_blk, x0 = _llada_choose(blk, masked, counts[:, j], temperature, remasking, generator,
                                           (threshold, factor))
            rec.commit_block(block * per_block + j, lo, chosen_blk, blk)
            gen[:, lo:hi] = torch.where(chosen_blk, x0, gen[:, lo:hi])
    return rec.finish(
        x, prompt_len=prompt_len, gen_len=gen_length, steps=steps, block_length=block_length, mask_id=mask_id,
        logit_shift=logit_shift, policy=_policy_name(f"llada/{remasking.value}", threshold, factor, cache),
        attention_mask=mask,
    )


def _sample_tokens(
    logits: Tensor, temperature: float, top_p: float | None, top_k: int | None, generator
) -> tuple[Tensor, Tensor]:
    """Dream's token draw. logits: (n, vocab) -> (probs after temperature and filters, x0: (n,))."""
    scaled = logits.float() / temperature if temperature > 0 else logits.float()
    probs = filter_top_k(filter_top_p(scaled, top_p), top_k).softmax(-1)  # (n, vocab)
    if temperature > 0 and probs.shape[0] > 0:
        x0 = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    else:
        x0 = probs.argmax(-1)
    return probs, x0


def _dream_confidence(probs: Tensor, x0: Tensor, alg: DreamAlg) -> Tensor:
    """(n, vocab), (n,) -> (n,) confidence used to rank masked positions."""
    if alg is DreamAlg.MASKGIT_PLUS:
        return probs.gather(-1, x0.unsqueeze(-1)).squeeze(-1)
    if alg is DreamAlg.TOPK_MARGIN:
        return confidence_scores(probs, Confidence.MARGIN)
    return confidence_scores(probs, Confidence.NEG_ENTROPY)


def _dream_choose(logits, masked, step, steps, times, alg, sampling, alg_temp, generator, rule=(None, None)):
    """One Dream step. logits: (batch, gen, vocab), masked: (batch, gen) bool; rule: (threshold, factor),
    at most one set: at least max(1, the schedule's count) and every position the rule accepts.

    Returns chosen: (batch, gen) bool and x0: (batch, gen) (valid where chosen).
    """
    x0 = torch.zeros(masked.shape, dtype=torch.long, device=masked.device)
    if alg is DreamAlg.ORIGIN:
        p_transfer = 1.0 if step == steps - 1 else float(1.0 - times[step + 1] / times[step])
        draw = torch.rand(masked.shape, device=masked.device, generator=generator)
        chosen = masked & (draw < p_transfer)
        x0[chosen] = _sample_tokens(logits[chosen], *sampling, generator)[1]
        return chosen, x0
    probs, x0_masked = _sample_tokens(logits[masked], *sampling, generator)  # (n_masked, vocab), (n_masked,)
    x0[masked] = x0_masked
    conf = torch.full(masked.shape, float("-inf"), device=masked.device)
    conf[masked] = _dream_confidence(probs, x0_masked, alg)
    counts = dream_transfer_counts(masked.sum(-1), step, steps, times)  # (batch,)
    if alg_temp:
        return select_sampled(conf, counts, alg_temp, generator), x0
    if rule != (None, None):
        return select_parallel(conf.double(), counts.clamp_min(1), *rule), x0
    return select_top(conf, counts), x0


def dream_decode(
    logits_fn: LogitsFn,
    prompt_ids: Tensor,
    gen_length: int,
    steps: int,
    mask_id: int,
    alg: DreamAlg | str = DreamAlg.ORIGIN,
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int | None = None,
    alg_temp: float | None = None,
    eps: float = 1e-3,
    logit_shift: int = 1,
    attention_mask: Tensor | None = None,
    generator: torch.Generator | None = None,
    record_topk: bool = False,
    record_states: bool = False,
    threshold: float | None = None,
    factor: float | None = None,
    cache: CachedLogits | None = None,
) -> DecodeTrace:
    """Dream's ``diffusion_generate`` over one block covering the whole answer.

    Times run linearly from 1 to ``eps`` over ``steps`` steps (t -> s). ``origin``: every masked
    position unmasks with probability 1 - s/t (all at the last step), with a token drawn from the
    (temperature, top-p, top-k) distribution. The confidence algorithms draw a token for every masked
    position, score it (``maskgit_plus``: its probability, ``topk_margin``: top-1 minus top-2,
    ``entropy``: negative entropy) and commit floor(masked * (1 - s/t)) positions (all at the last
    step): the most confident, or, with ``alg_temp`` > 0, drawn without replacement from
    softmax(confidence / alg_temp). Counts are per row; Dream takes the batch mean, which is the same
    number because rows stay in step. Arguments as in `llada_decode`; ``logit_shift`` defaults to 1.

    ``threshold`` / ``factor`` (``maskgit_plus`` without ``alg_temp``: the rules compare the drawn token's
    probability) commit at least max(1, the schedule's count) per step plus every position the rule accepts;
    the steps left once the answer is full run no forward. ``cache``: the prompt's keys / values are
    reused after the first step (one block, so ``prefix`` and ``dual`` coincide).
    """
    check_prompt(prompt_ids, mask_id, attention_mask, logit_shift)
    check_positive_int(gen_length, "gen_length")
    check_positive_int(steps, "steps")
    check_nonneg(temperature, "temperature")
    check_dream_sampling(top_p, top_k, alg_temp, eps)
    alg = coerce_enum(DreamAlg, alg, "alg")
    _check_dream_parallel(alg, alg_temp, threshold, factor, cache, record_topk)
    prompt_len = prompt_ids.shape[1]
    x, mask = canvas(prompt_ids, gen_length, mask_id, attention_mask)  # x: (batch, prompt + gen)
    gen = x[:, prompt_len:]
    times = dream_timesteps(steps, eps, device=x.device)  # (steps + 1,)
    rec = Recorder(x, gen_length, record_topk, record_states)
    logits = None
    for step in range(steps):
        masked = gen.eq(mask_id)
        if not bool(masked.any()):  # finished early under a parallel rule: no forward
            rec.observe(x, logits)
            continue
        if cache is None:
            logits = forbid_mask(predict_window(logits_fn, x, mask, prompt_len, logit_shift), mask_id)
        else:
            blk = cached_block_logits(cache, x, mask, prompt_len, x.shape[1], logit_shift, refresh=step == 0)
            logits = forbid_mask(blk, mask_id)
        rec.observe(x, logits)
        chosen, x0 = _dream_choose(
            logits, masked, step, steps, times, alg, (temperature, top_p, top_k), alg_temp, generator,
            (threshold, factor),
        )
        rec.commit(step, chosen, logits)
        gen[chosen] = x0[chosen]
    return rec.finish(
        x, prompt_len=prompt_len, gen_len=gen_length, steps=steps, block_length=gen_length, mask_id=mask_id,
        logit_shift=logit_shift, policy=_policy_name(f"dream/{alg.value}", threshold, factor, cache),
        attention_mask=mask,
    )


def _check_dream_parallel(alg: DreamAlg, alg_temp, threshold, factor, cache, record_topk) -> None:
    check_parallel_rule(threshold, factor)
    if (threshold is not None or factor is not None) and (alg is not DreamAlg.MASKGIT_PLUS or alg_temp):
        raise ValueError(f"alg: threshold / factor compare the drawn token's probability: they need "
                         f"alg='maskgit_plus' without alg_temp, got alg={alg.value!r}, alg_temp={alg_temp!r}")
    check_cache(cache, 0.0, record_topk)
