"""Decoding-stability metrics on `DecodeTrace`s (the paper's section 5). Pure torch, no transformers.

Conventions: step t reads the state x_t *before* step t's commit (``trace.state_at(t)``); a
model's "prediction" at a position is its argmax over every token but the mask token, read with the
model's logit shift (``logit_shift=None`` takes the trace's). Classifier-free guidance is not
replayed: teacher-forced models see the conditional state only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..enums import Confidence, PostCommitMode, coerce_enum
from ..scoring.forward import CachedLogits, LogitsFn, cached_block_logits, forbid_mask, predict_window
from ..scoring.policies import confidence_scores, llada_transfer_counts, select_parallel, select_top
from ..scoring.trace import DecodeTrace


@dataclass
class FlipRateResult:
    """Teacher-forced frontier decision flips.

    ``flipped``: (batch, gen_len) bool, True where the student's prediction at the teacher's commit
    step differs from the committed token; ``first_flip_step``: (batch,) earliest such step, -1 if none.
    ``set_disagreement``: mean over (step, row) with a non-empty frontier of |C_t^q Δ C_t| / |C_t|;
    ``set_disagreement_rows``: (batch,) the same mean per row (nan for a row with no frontier).
    """

    flip_rate: float
    flip_rate_confident: float  # over decisions with teacher margin >= margin_threshold; nan if none
    num_decisions: int
    num_flips: int
    num_confident: int
    num_confident_flips: int
    set_disagreement: float
    margin_threshold: float
    flipped: Tensor
    first_flip_step: Tensor
    set_disagreement_rows: Tensor


@dataclass
class PostCommitResult:
    """Post-commit agreement on a model's own trajectory.

    ``disagree_fraction``: (batch, gen_len) share of post-commit steps whose top-1 differs from the
    committed token; nan at positions committed at the last step (no later step to read).
    """

    mean_disagree: float
    never_agree: float
    num_positions: int
    disagree_fraction: Tensor


def _shift(trace: DecodeTrace, logit_shift: int | None) -> int:
    if logit_shift not in (None, 0, 1):
        raise ValueError(f"logit_shift must be None, 0 or 1, got {logit_shift!r}")
    return trace.logit_shift if logit_shift is None else logit_shift


def _predict(trace: DecodeTrace, logits_fn: LogitsFn, x: Tensor, rows: Tensor | None, shift: int) -> Tensor:
    """(n, prompt + gen) states of ``trace`` rows -> (n, gen, vocab) mask-free predictions."""
    mask = trace.attention_mask
    if mask is not None and rows is not None:
        mask = mask[rows]
    return forbid_mask(predict_window(logits_fn, x, mask, trace.prompt_len, shift), trace.mask_id)


def _frontier_set_disagreement(trace: DecodeTrace, step: int, logits: Tensor, kind: Confidence,
                               rule: tuple[float | None, float | None] = (None, None)) -> Tensor:
    """(batch,) |C^q Δ C| / |C| at ``step`` (nan where C is empty); C^q = the student's top-|C|
    confidence positions among the masked positions of the current block, or, under a parallel ``rule``
    (threshold, factor), the set that rule commits from the student's probabilities (at least the
    schedule's count for the step, as the sampler)."""
    frontier = trace.frontier(step)  # (batch, gen)
    lo, hi = trace.block_bounds(step)
    eligible = trace.masked_at(step).clone()
    eligible[:, :lo] = False
    eligible[:, hi:] = False
    k = frontier.sum(-1)  # (batch,)
    if rule != (None, None):
        conf = confidence_scores(logits.double().softmax(-1), Confidence.PROB).masked_fill(~eligible, float("-inf"))
        j = step % trace.steps_per_block
        count = llada_transfer_counts(torch.tensor([trace.block_length]), trace.steps_per_block)[0, j]
        student_set = select_parallel(conf, torch.full_like(k, int(count)), *rule)
    else:
        conf = confidence_scores(logits.float().softmax(-1), kind).masked_fill(~eligible, float("-inf"))
        student_set = select_top(conf, k)
    sym = (student_set ^ frontier).sum(-1).double()
    return torch.where(k > 0, sym / k.clamp_min(1), torch.full_like(sym, float("nan")))


def _cached_predict(trace: DecodeTrace, cache: CachedLogits, step: int, shift: int) -> Tensor:
    """(batch, gen, vocab) student predictions at ``step`` through its approximate KV cache, replayed on the
    teacher's states: refreshed at the block's first step, windows afterwards. Only the current block is
    read (zeros elsewhere; the frontier and the set disagreement never look outside it)."""
    lo, hi = trace.block_bounds(step)
    blk = cached_block_logits(cache, trace.state_at(step), trace.attention_mask, trace.prompt_len + lo,
                              trace.prompt_len + hi, shift, refresh=step % trace.steps_per_block == 0)
    out = blk.new_zeros(trace.batch_size, trace.gen_len, blk.shape[-1])
    out[:, lo:hi] = blk
    return forbid_mask(out, trace.mask_id)


def frontier_flip_rate(
    teacher_trace: DecodeTrace,
    student_logits_fn: LogitsFn,
    margin_threshold: float = 0.1,
    confidence: Confidence | str = Confidence.PROB,
    logit_shift: int | None = None,
    rule: tuple[float | None, float | None] = (None, None),
    cache: CachedLogits | None = None,
) -> FlipRateResult:
    """Run the student on each teacher state S_{t-1}; a flip is a student prediction that differs
    from the teacher's committed token at a teacher-frontier position. ``confidence`` sets the
    student's commit rule for the frontier-set disagreement. One student forward per step with a
    non-empty frontier.

    Under a parallel policy a step commits several positions: each is one decision of the teacher's state
    at that step, and a flip of any of them counts once. ``rule`` (threshold, factor): the student's set
    for the disagreement is the one that rule picks. ``cache``: the student reads through its own
    approximate KV cache, refreshed on the teacher's state at each block's first step (as it would be
    had it decoded the teacher's trajectory under the same cache mode)."""
    kind = coerce_enum(Confidence, confidence, "confidence")
    if not margin_threshold >= 0:
        raise ValueError(f"margin_threshold must be >= 0, got {margin_threshold!r}")
    shift, trace = _shift(teacher_trace, logit_shift), teacher_trace
    flipped = torch.zeros_like(trace.commit_step, dtype=torch.bool)  # (batch, gen)
    ratios = []
    for step in range(trace.steps):
        frontier = trace.frontier(step)
        if not bool(frontier.any()):
            continue
        if cache is None:
            logits = _predict(trace, student_logits_fn, trace.state_at(step), None, shift)  # (batch, gen, vocab)
        else:
            logits = _cached_predict(trace, cache, step, shift)
        flipped |= frontier & (logits.argmax(-1) != trace.generated)
        ratios.append(_frontier_set_disagreement(trace, step, logits, kind, rule))
    confident = trace.commit_margin >= margin_threshold  # (batch, gen)
    n_conf, n_conf_flips = int(confident.sum()), int((flipped & confident).sum())
    big = torch.full_like(trace.commit_step, trace.steps)
    first = torch.where(flipped, trace.commit_step, big).min(-1).values  # (batch,)
    # (steps with a frontier, batch)
    per_pair = torch.stack(ratios) if ratios else torch.empty(0, trace.batch_size, dtype=torch.float64)
    return FlipRateResult(
        flip_rate=float(flipped.sum()) / flipped.numel(),
        flip_rate_confident=n_conf_flips / n_conf if n_conf else float("nan"),
        num_decisions=flipped.numel(),
        num_flips=int(flipped.sum()),
        num_confident=n_conf,
        num_confident_flips=n_conf_flips,
        set_disagreement=float(per_pair.nanmean()) if per_pair.numel() else float("nan"),
        margin_threshold=float(margin_threshold),
        flipped=flipped,
        first_flip_step=torch.where(first == trace.steps, torch.full_like(first, -1), first),
        set_disagreement_rows=per_pair.nanmean(0),
    )


def _loo_top1(trace: DecodeTrace, logits_fn: LogitsFn, step: int, shift: int, max_batch: int) -> Tensor:
    """(batch, gen) leave-one-out top-1 at positions committed before ``step``; -1 elsewhere."""
    state = trace.state_at(step)  # (batch, prompt + gen)
    out = torch.full_like(trace.commit_step, -1)
    pairs = (~trace.masked_at(step)).nonzero()  # (n, 2): row, gen position
    for chunk in pairs.split(max_batch):
        rows, pos = chunk[:, 0], chunk[:, 1]
        probe = state[rows].clone()  # (n, prompt + gen)
        idx = torch.arange(len(rows), device=probe.device)
        probe[idx, trace.prompt_len + pos] = trace.mask_id
        logits = _predict(trace, logits_fn, probe, rows, shift)  # (n, gen, vocab)
        out[rows, pos] = logits[idx, pos].argmax(-1)
    return out


def post_commit_top1(
    trace: DecodeTrace,
    logits_fn: LogitsFn,
    mode: PostCommitMode | str = PostCommitMode.LOO,
    logit_shift: int | None = None,
    max_batch: int = 16,
    include_masked: bool = True,
) -> Tensor:
    """(steps, batch, gen) top-1 of ``logits_fn`` at every generated position of every state.

    Still-masked positions: the plain prediction (skipped, -1, if not ``include_masked``).
    Committed positions: ``loo`` re-masks that single position (batched, ``max_batch`` rows per
    forward); ``raw`` reads the output at the unmasked position."""
    mode = coerce_enum(PostCommitMode, mode, "mode")
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max_batch must be a positive int, got {max_batch!r}")
    shift = _shift(trace, logit_shift)
    # table: (steps, batch, gen)
    table = torch.full_like(trace.commit_step, -1).unsqueeze(0).repeat(trace.steps, 1, 1)
    for step in range(trace.steps):
        if include_masked or mode is PostCommitMode.RAW:
            table[step] = _predict(trace, logits_fn, trace.state_at(step), None, shift).argmax(-1)
        if mode is PostCommitMode.LOO:
            committed = ~trace.masked_at(step)
            table[step][committed] = _loo_top1(trace, logits_fn, step, shift, max_batch)[committed]
        elif not include_masked:
            table[step][trace.masked_at(step)] = -1
    return table


def post_commit_mismatch(
    trace: DecodeTrace,
    logits_fn: LogitsFn,
    mode: PostCommitMode | str = PostCommitMode.LOO,
    logit_shift: int | None = None,
    max_batch: int = 16,
    table: Tensor | None = None,
) -> PostCommitResult:
    """Mean-disagree and never-agree over the recorded states after each commit (steps > t_commit).

    mean_disagree: average over positions of the share of their post-commit steps with top-1 ≠ the
    committed token; never_agree: share of positions whose top-1 never matches afterwards. Positions
    committed at the last step have no later state and are left out. ``table``: a `post_commit_top1`
    result to reuse (e.g. one also read by `stability_lag`); only its post-commit entries are read."""
    if table is None:
        table = post_commit_top1(trace, logits_fn, mode, logit_shift, max_batch, include_masked=False)
    elif table.shape != (trace.steps, *trace.commit_step.shape):
        raise ValueError(f"table must have shape {(trace.steps, *trace.commit_step.shape)}, got {tuple(table.shape)}")
    steps = torch.arange(trace.steps, device=table.device).view(-1, 1, 1)
    after = trace.commit_step.unsqueeze(0) < steps  # (steps, batch, gen)
    disagree = (table != trace.generated.unsqueeze(0)) & after
    n_after, n_dis = after.sum(0), disagree.sum(0)  # (batch, gen)
    has = n_after > 0
    nan = torch.full(n_dis.shape, float("nan"), dtype=torch.float64, device=n_dis.device)
    frac = torch.where(has, n_dis.double() / n_after.clamp_min(1), nan)
    num = int(has.sum())
    return PostCommitResult(
        mean_disagree=float(frac[has].mean()) if num else float("nan"),
        never_agree=float((n_dis == n_after)[has].double().mean()) if num else float("nan"),
        num_positions=num,
        disagree_fraction=frac,
    )


def stability_lag(trace: DecodeTrace, top1: Tensor | None = None) -> Tensor:
    """(batch, gen) δ_lag = t_align − t_commit.

    t_align is the first step from which the top-1 (``top1``: (steps, batch, gen), default the
    trace's ``record_topk`` reading) equals the final token at every later step; T if it differs at
    the last step. Negative values mean the top-1 had settled before the commit."""
    top1 = trace.top1_token if top1 is None else top1
    if top1 is None:
        raise ValueError("trace has no top1_token: decode with record_topk=True or pass top1")
    if top1.shape != (trace.steps, *trace.commit_step.shape):
        expected = (trace.steps, *trace.commit_step.shape)
        raise ValueError(f"top1 must have shape {expected}, got {tuple(top1.shape)}")
    agree = (top1 == trace.generated.unsqueeze(0)).long()  # (steps, batch, gen)
    agree_to_end = agree.flip(0).cumprod(0).flip(0)  # 1 at t iff agreement on every step >= t
    t_align = trace.steps - agree_to_end.sum(0)
    return t_align - trace.commit_step


def lag_ccdf(lags: Tensor) -> tuple[Tensor, Tensor]:
    """Empirical CCDF: sorted distinct lag values v and P(lag >= v) for each."""
    flat = lags.flatten()
    if flat.numel() == 0:
        raise ValueError("lags must not be empty")
    values, counts = flat.unique(sorted=True, return_counts=True)
    at_least = counts.flip(0).cumsum(0).flip(0)  # count of lags >= each value
    return values, at_least.double() / flat.numel()


def stepwise_prob_mse(
    teacher_trace: DecodeTrace,
    student_logits_fn: LogitsFn,
    teacher_logits_fn: LogitsFn,
    logit_shift: int | None = None,
) -> Tensor:
    """(steps, batch) ‖p_q − p*‖² on the teacher's states, averaged over the still-masked generated
    positions of each row (nan where none is masked). Both models read with the same shift."""
    trace, shift = teacher_trace, _shift(teacher_trace, logit_shift)
    out = torch.full((trace.steps, trace.batch_size), float("nan"), dtype=torch.float64)
    for step in range(trace.steps):
        masked = trace.masked_at(step)  # (batch, gen)
        if not bool(masked.any()):
            continue
        state = trace.state_at(step)
        p_q = _predict(trace, student_logits_fn, state, None, shift).double().softmax(-1)
        p_t = _predict(trace, teacher_logits_fn, state, None, shift).double().softmax(-1)
        sq = ((p_q - p_t) ** 2).sum(-1)  # (batch, gen)
        out[step] = ((sq * masked).sum(-1) / masked.sum(-1)).cpu()  # 0/0 -> nan for empty rows
    return out


def align_to_first_flip(per_step: Tensor, first_flip_step: Tensor) -> tuple[Tensor, Tensor]:
    """Re-index (steps, batch) values by offset from each row's first flip and average over rows.

    Returns offsets (2 * steps - 1,) from -(steps - 1) to steps - 1 and the nan-mean at each offset
    over rows that flipped (``first_flip_step`` >= 0); nan where no row contributes."""
    steps, batch = per_step.shape
    if first_flip_step.shape != (batch,):
        raise ValueError(f"first_flip_step must have shape ({batch},), got {tuple(first_flip_step.shape)}")
    offsets = torch.arange(-(steps - 1), steps)
    total = torch.zeros(2 * steps - 1, dtype=torch.float64)
    count = torch.zeros(2 * steps - 1, dtype=torch.float64)
    t = torch.arange(steps).view(-1, 1).expand(steps, batch)  # (steps, batch)
    idx = t - first_flip_step.cpu().view(1, -1) + (steps - 1)
    keep = (first_flip_step.cpu().view(1, -1) >= 0) & ~per_step.cpu().isnan()
    total.index_add_(0, idx[keep], per_step.cpu().double()[keep])
    count.index_add_(0, idx[keep], torch.ones(int(keep.sum()), dtype=torch.float64))
    return offsets, torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, float("nan")))
