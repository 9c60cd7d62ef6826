"""`evaluate()`: the quality of a (quantized) diffusion LM as one flat dict of numbers, and `table()`.

Per held-out text (``"wiki-val"`` and ``"lee"`` by default):

* ``{text}/nll``, ``{text}/acc``: masked-token NLL (nats, full vocabulary) and accuracy (argmax over
  every token but the mask token) at ``mask_ratio``, on ``nll_samples`` disjoint ``seq_len``-token
  windows. The masked positions come from ``seed`` alone, so every model is scored on the same ones;
  the model's logit shift is respected (Dream reads position i at ``logits[:, i - 1]``).
* with a ``teacher`` (the full-precision model), on ``num_prompts`` held-out prompts of ``prompt_len``
  tokens and the teacher's greedy low-confidence LLaDA trajectories (``teacher_traces``, reusable):
  ``flip_rate`` (and ``flip_rate_m0.1`` at teacher margin >= 0.1, with ``flips``, ``decisions``,
  ``flips_m0.1``, ``decisions_m0.1``), ``frontier_set_disagreement``, the post-commit mismatch of the
  model's own greedy trajectory read leave-one-out (``post_commit_mean_disagree``,
  ``post_commit_never_agree``, on the first ``post_commit_prompts`` prompts: it costs about
  prompts * gen_length^2 / 2 forward rows) and ``agreement``, the share of generated tokens of the
  model's greedy decode equal to the teacher's.
* the decoding policy (issue 34): ``decode`` (``schedule``: the fixed count per step, one when steps =
  gen_length; ``threshold`` / ``factor``: Fast-dLLM's parallel rules) and ``cache`` (``none``, ``prefix``,
  ``dual``: the approximate KV cache) apply to the teacher's trajectories, the model's own decode and its
  teacher-forced readings alike. With a teacher: ``steps_per_token`` (forward passes per generated token of
  the model's own decode), ``teacher_steps_per_token`` and ``tokens_per_second`` (the model's own decode,
  wall clock).

Keys without a ``{text}/`` prefix pool the texts (token- or decision-weighted).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from ..arch import get_adapter
from ..data import calibration_sequences, load_texts, token_stream
from ..devices import execution_device
from ..enums import Remasking
from ..scoring.checks import check_llada_schedule, check_positive_int
from ..scoring.decoding import DecodePolicy
from ..scoring.sampler import llada_decode
from ..scoring.trace import DecodeTrace
from .decoding import make_policy, policy_cache, trace_policy
from .metrics import frontier_flip_rate, post_commit_mismatch, post_commit_top1, stability_lag

logger = logging.getLogger(__name__)

DEFAULT_TEXTS = ("wiki-val", "lee")
MARGIN = 0.1
_PROMPT_SEED_OFFSET = 7  # prompts and NLL windows are drawn with different seeds


def _model_facts(model: Any) -> tuple[int, int, int | None]:
    """(mask id, logit shift, maximum length) of a model, from its adapter and config."""
    adapter = get_adapter(model)
    return adapter.mask_id(model.config), adapter.logit_shift, adapter.max_length(model.config)


def logits_fn_of(model: Any):
    """x (batch, seq) -> float32 logits (batch, seq, vocab) of ``model``, without gradients."""
    device = execution_device(model)

    @torch.no_grad()
    def fn(x: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        mask = None if attention_mask is None else attention_mask.to(device)
        return model(input_ids=x.to(device), attention_mask=mask).logits.float().cpu()

    return fn


def mask_positions(shape: tuple[int, int], ratio: float, logit_shift: int, seed: int) -> Tensor:
    """(batch, seq) bool: exactly round(ratio * (seq - shift)) masked positions per row, chosen among
    the positions a shifted model can predict (>= logit_shift), from ``seed`` alone."""
    batch, seq = shape
    eligible = seq - logit_shift
    count = max(1, round(ratio * eligible))
    gen = torch.Generator().manual_seed(seed)
    order = torch.rand((batch, eligible), generator=gen).argsort(-1)[:, :count] + logit_shift
    out = torch.zeros(shape, dtype=torch.bool)
    out.scatter_(1, order, True)
    return out


@torch.no_grad()
def masked_nll(model: Any, seqs: Tensor, ratio: float, seed: int, batch_size: int = 16,
               per_window: bool = False) -> dict[str, Any]:
    """Masked-token NLL (full vocabulary) and accuracy (mask token excluded) at mask ratio ``ratio``.

    seqs: (n, seq_len) token windows. Returns ``nll``, ``acc`` and ``masked_tokens``; with ``per_window``
    also ``nll_per_window``, the mean NLL of each window (every window has the same number of masks)."""
    mask_id, shift, _ = _model_facts(model)
    fn = logits_fn_of(model)
    masked = mask_positions(tuple(seqs.shape), ratio, shift, seed)  # (n, seq)
    nll_sum, hits, count, rows = 0.0, 0, 0, []
    for start in range(0, seqs.shape[0], batch_size):
        x, m = seqs[start:start + batch_size], masked[start:start + batch_size]
        logits = fn(x.masked_fill(m, mask_id))  # (b, seq, vocab)
        if shift:
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)  # position i read at i - 1
        picked, target = logits[m], x[m]  # (k, vocab), (k,)
        nll = F.cross_entropy(picked, target, reduction="none")  # (k,), row-major: windows in order
        nll_sum += float(nll.sum())
        if per_window:
            rows += nll.view(x.shape[0], -1).mean(-1).tolist()
        picked[:, mask_id] = float("-inf")
        hits += int((picked.argmax(-1) == target).sum())
        count += int(target.numel())
    out = {"nll": nll_sum / count, "acc": hits / count, "masked_tokens": count}
    return {**out, "nll_per_window": rows} if per_window else out


def _held_out(texts: Sequence[str] | Mapping[str, Any]) -> dict[str, Any]:
    """{name: datasets.Dataset} for names ("wiki-val", "lee") or a mapping name -> texts."""
    if isinstance(texts, str):
        texts = (texts,)
    items = texts.items() if isinstance(texts, Mapping) else ((name, name) for name in texts)
    out = {str(name): load_texts(source) for name, source in items}
    if not out:
        raise ValueError("texts must name at least one held-out text, e.g. ('wiki-val', 'lee')")
    return out


def greedy_trace(model: Any, prompts: Tensor, gen_length: int, block_length: int, steps: int,
                 progress: Callable[[], Any] | None = None, policy: DecodePolicy | None = None) -> DecodeTrace:
    """Greedy (temperature 0) low-confidence LLaDA decode of ``model`` after prompts (batch, prompt_len)
    under ``policy`` (default: the fixed schedule, no cache); ``progress()`` is called after each forward,
    full or through the cache: once per decoding step that runs one (a step slot that a parallel rule left
    empty runs none, see `_teacher_traces`)."""
    mask_id, shift, _ = _model_facts(model)
    fn = logits_fn_of(model)
    policy = policy or DecodePolicy()
    cache = policy_cache(model, policy)
    if progress is not None:
        inner = fn

        def fn(x: Tensor, attention_mask: Tensor | None = None) -> Tensor:
            out = inner(x, attention_mask)
            progress()
            return out

        cache = None if cache is None else _CountedCache(cache, progress)
    return llada_decode(fn, prompts, gen_length, block_length, steps, mask_id, temperature=0.0,
                        remasking=Remasking.LOW_CONFIDENCE, logit_shift=shift, cache=cache, **policy.rule_kwargs())


class _CountedCache:
    """An approximate KV cache that calls ``progress()`` after each of its forwards (a refresh or a window)."""

    def __init__(self, cache: Any, progress: Callable[[], Any]) -> None:
        self.cache, self.progress, self.mode = cache, progress, cache.mode

    def refresh(self, x: Tensor, attention_mask: Tensor | None) -> Tensor:
        out = self.cache.refresh(x, attention_mask)
        self.progress()
        return out

    def window(self, x: Tensor, attention_mask: Tensor | None, start: int, end: int) -> Tensor:
        out = self.cache.window(x, attention_mask, start, end)
        self.progress()
        return out


def _teacher_traces(teacher: Any, tokenizer: Any, data: Mapping[str, Any], num_prompts: int, prompt_len: int,
                    gen_length: int, block_length: int, steps: int, seed: int,
                    policy: DecodePolicy | None = None) -> dict[str, DecodeTrace]:
    """The teacher's greedy trajectories on each text, with a bar over its decoding step slots (the longest
    silent stretch of an evaluation otherwise: ~50 s on the shipped model on 2 cores). A step advances the bar
    when its forward (full or cached) returns; the slots a parallel rule leaves empty after a block fills run
    no forward and are counted when the text is done, so the bar ends at its total under every policy."""
    out = {}
    with tqdm(total=len(data) * steps, desc="teacher trajectories", unit="step", leave=False) as bar:
        for i, (name, dataset) in enumerate(data.items()):
            bar.set_postfix_str(name)
            out[name] = greedy_trace(teacher, _prompts(dataset, tokenizer, num_prompts, prompt_len, seed),
                                     gen_length, block_length, steps, progress=bar.update, policy=policy)
            bar.update((i + 1) * steps - bar.n)  # the empty slots of blocks a parallel rule filled early
            logger.info("teacher trajectories on %s: %d prompts", name, num_prompts)
    return out


def _prompts(dataset: Any, tokenizer: Any, num_prompts: int, prompt_len: int, seed: int) -> Tensor:
    return calibration_sequences(dataset, tokenizer, num_prompts, prompt_len, seed=seed + _PROMPT_SEED_OFFSET)


def build_teacher_traces(
    teacher: Any, tokenizer: Any, *, texts: Sequence[str] | Mapping[str, Any] = DEFAULT_TEXTS, num_prompts: int = 16,
    prompt_len: int = 64, gen_length: int = 64, block_length: int = 32, steps: int | None = None, seed: int = 0,
    decode: str = "schedule", threshold: float = 0.9, factor: float = 1.0, cache: str = "none",
) -> dict[str, DecodeTrace]:
    """The teacher's greedy trajectories on each held-out text under the decoding policy (see `evaluate`):
    build once, pass to every `evaluate` with the same policy."""
    steps = gen_length if steps is None else steps
    policy = make_policy(teacher, decode, threshold, factor, cache)
    _check_decode(teacher, num_prompts, prompt_len, gen_length, block_length, steps)
    return _teacher_traces(teacher, tokenizer, _held_out(texts), num_prompts, prompt_len, gen_length, block_length,
                           steps, seed, policy)


def _check_decode(model: Any, num_prompts: int, prompt_len: int, gen_length: int, block_length: int,
                  steps: int) -> None:
    for name, value in (("num_prompts", num_prompts), ("prompt_len", prompt_len)):
        check_positive_int(value, name)
    check_llada_schedule(gen_length, block_length, steps)
    _, _, max_len = _model_facts(model)
    if max_len is not None and prompt_len + gen_length > max_len:
        raise ValueError(f"prompt_len + gen_length ({prompt_len + gen_length}) exceeds the model's maximum length "
                         f"({max_len})")


def _check_traces(traces: Mapping[str, DecodeTrace], names: list[str], prompt_len: int, gen_length: int,
                  block_length: int, steps: int, policy: DecodePolicy | None = None) -> None:
    """teacher_traces must cover every text and match the decode settings and policy."""
    missing = sorted(set(names) - set(traces))
    if missing:
        raise ValueError(f"teacher_traces has no trajectories for {missing} (it has {sorted(traces)})")
    for name in names:
        t = traces[name]
        got = (t.prompt_len, t.gen_len, t.block_length, t.steps)
        if got != (prompt_len, gen_length, block_length, steps):
            raise ValueError(f"teacher_traces[{name!r}] was decoded with (prompt_len, gen_length, block_length, "
                             f"steps) = {got}, evaluate asks for {(prompt_len, gen_length, block_length, steps)}")
        want = trace_policy(policy or DecodePolicy())
        if t.policy != want:
            raise ValueError(f"teacher_traces[{name!r}] was decoded with policy {t.policy!r}, evaluate asks for "
                             f"{want!r} (decode / threshold / factor / cache)")


def decode_metrics(model: Any, trace: DecodeTrace, post_commit_prompts: int,
                   details: bool = False, progress: Callable[[str], None] | None = None,
                   policy: DecodePolicy | None = None) -> dict[str, Any]:
    """Flip rates on the teacher's trajectory, and agreement / post-commit mismatch of the model's own.

    details: also per-prompt lists (``flips_per_prompt``, ``confident_flips_per_prompt``,
    ``confident_per_prompt``, ``set_disagreement_per_prompt``, for paired comparisons over prompts),
    ``post_commit_disagree_per_prompt`` (mean-disagree of each post-commit prompt) and ``lags``, the δ_lag
    of every position of the post-commit prompts' own decodes (leave-one-out reading).
    progress: called with the name of each part as it finishes ("flip rate", "decode", "post-commit").
    policy: the decoding policy of the teacher's trace; the model's readings and own decode follow it
    (the post-commit readings stay full forwards).
    """
    done = progress or (lambda part: None)
    policy = policy or DecodePolicy()
    fn = logits_fn_of(model)
    rule = (policy.rule_kwargs().get("threshold"), policy.rule_kwargs().get("factor"))
    flips = frontier_flip_rate(trace, fn, margin_threshold=MARGIN, rule=rule, cache=policy_cache(model, policy))
    done("flip rate")
    prompts = trace.sequences[:, : trace.prompt_len]
    start = time.perf_counter()
    own = greedy_trace(model, prompts, trace.gen_len, trace.block_length, trace.steps, policy=policy)
    seconds = time.perf_counter() - start
    done("decode")
    out = {"flip_rate": flips.flip_rate, f"flip_rate_m{MARGIN:g}": flips.flip_rate_confident,
           "steps_per_token": own.steps_per_token(), "teacher_steps_per_token": trace.steps_per_token(),
           "tokens_per_second": own.generated.numel() / seconds, "decode_seconds": seconds,
           "flips": flips.num_flips, "decisions": flips.num_decisions,
           f"flips_m{MARGIN:g}": flips.num_confident_flips, f"decisions_m{MARGIN:g}": flips.num_confident,
           "frontier_set_disagreement": flips.set_disagreement,
           "agreement": float((own.generated == trace.generated).double().mean()),
           "agreement_tokens": int(own.generated.numel())}
    if post_commit_prompts > 0:
        keep = min(post_commit_prompts, own.batch_size)
        sub = DecodeTrace(**{**own.to_dict(), "sequences": own.sequences[:keep],
                             "commit_step": own.commit_step[:keep], "commit_margin": own.commit_margin[:keep]})
        table = post_commit_top1(sub, fn, mode="loo", max_batch=64, include_masked=details)
        post = post_commit_mismatch(sub, fn, table=table)
        out.update(post_commit_mean_disagree=post.mean_disagree, post_commit_never_agree=post.never_agree)
        if details:
            out["lags"] = stability_lag(sub, table).flatten().tolist()
            out["post_commit_disagree_per_prompt"] = post.disagree_fraction.nanmean(-1).tolist()
        done("post-commit")
    if details:
        confident = trace.commit_margin >= MARGIN  # (batch, gen)
        out.update(flips_per_prompt=flips.flipped.sum(-1).tolist(),
                   confident_flips_per_prompt=(flips.flipped & confident).sum(-1).tolist(),
                   confident_per_prompt=confident.sum(-1).tolist(),
                   set_disagreement_per_prompt=flips.set_disagreement_rows.tolist())
    return out


def _pool(per_text: dict[str, dict[str, float]]) -> dict[str, float]:
    """Token- / decision-weighted metrics over all texts."""
    rows = list(per_text.values())

    def total(key: str) -> float:
        return sum(r[key] for r in rows)

    out: dict[str, float] = {"nll": sum(r["nll"] * r["masked_tokens"] for r in rows) / total("masked_tokens"),
                             "acc": sum(r["acc"] * r["masked_tokens"] for r in rows) / total("masked_tokens")}
    if "flips" in rows[0]:
        conf = f"decisions_m{MARGIN:g}"
        out["flip_rate"] = total("flips") / total("decisions")
        out[f"flip_rate_m{MARGIN:g}"] = total(f"flips_m{MARGIN:g}") / total(conf) if total(conf) else math.nan
        out["agreement"] = sum(r["agreement"] * r["agreement_tokens"] for r in rows) / total("agreement_tokens")
        for key in ("steps_per_token", "teacher_steps_per_token"):
            out[key] = sum(r[key] * r["agreement_tokens"] for r in rows) / total("agreement_tokens")
        out["tokens_per_second"] = total("agreement_tokens") / total("decode_seconds")
    return out


def _check_eval_args(mask_ratio: float, nll_samples: int, seq_len: int, post_commit_prompts: int,
                     max_len: int | None) -> None:
    check_positive_int(nll_samples, "nll_samples")
    check_positive_int(seq_len, "seq_len")
    if isinstance(post_commit_prompts, bool) or not isinstance(post_commit_prompts, int) or post_commit_prompts < 0:
        raise ValueError(f"post_commit_prompts must be an int >= 0, got {post_commit_prompts!r}")
    if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, (int, float)) or not 0 < mask_ratio < 1:
        raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio!r}")
    if max_len is not None and seq_len > max_len:
        raise ValueError(f"seq_len ({seq_len}) exceeds the model's maximum length ({max_len})")


def evaluate(
    model: Any, tokenizer: Any, teacher: Any = None, *, texts: Sequence[str] | Mapping[str, Any] = DEFAULT_TEXTS,
    num_prompts: int = 16, prompt_len: int = 64, gen_length: int = 64, block_length: int = 32,
    steps: int | None = None, nll_samples: int = 32, seq_len: int = 128, mask_ratio: float = 0.5, seed: int = 0,
    teacher_traces: Mapping[str, DecodeTrace] | None = None, post_commit_prompts: int = 1,
    return_traces: bool = False, details: bool = False, decode: str = "schedule", threshold: float = 0.9,
    factor: float = 1.0, cache: str = "none",
) -> dict[str, Any] | tuple[dict[str, Any], dict[str, DecodeTrace]]:
    """Evaluate ``model`` on held-out text, and against ``teacher`` when given (see the module docstring).

    Args:
        model: the model to score (LLaDA, Dream or another model with an optimum-fair adapter).
        tokenizer: its tokenizer (for the held-out text).
        teacher: the full-precision model whose greedy trajectories are the reference; None: NLL only
            (unless teacher_traces is given).
        texts: held-out text names ("wiki-val", "lee") or a mapping name -> list of strings / Dataset.
        num_prompts: prompts per text for the decoding metrics.
        prompt_len: tokens per prompt.
        gen_length: generated tokens per prompt.
        block_length: semi-autoregressive block length of the greedy low-confidence decode.
        steps: decoding steps (None = gen_length, one token per step).
        nll_samples: seq_len-token windows per text for the masked NLL (fewer if the text is short).
        seq_len: tokens per masked-NLL window.
        mask_ratio: share of masked positions per window.
        seed: seed of the NLL windows, their masked positions and the prompts.
        teacher_traces: trajectories from `build_teacher_traces()` or a previous ``return_traces=True``
            call; skips the teacher's decoding.
        post_commit_prompts: prompts whose own trajectory gets the leave-one-out post-commit mismatch
            (0 = skip; it costs about prompts * gen_length^2 / 2 forward rows per text, ~45 s per prompt
            for both texts on the shipped model on 2 CPU cores; the default 1 keeps evaluate at ~84 s).
        return_traces: return ``(metrics, teacher_traces)``.
        details: add per-text lists for paired statistics (see `decode_metrics`): ``<text>/flips_per_prompt``,
            ``<text>/confident_flips_per_prompt``, ``<text>/confident_per_prompt``,
            ``<text>/set_disagreement_per_prompt``, ``<text>/post_commit_disagree_per_prompt``,
            ``<text>/lags`` and ``<text>/nll_per_window``.
        decode: the commit rule: ``schedule`` (the fixed count per step), ``threshold`` or ``factor``
            (Fast-dLLM's parallel rules, at least the schedule's count per step).
        threshold: the threshold rule's probability, in (0, 1] (read with decode="threshold").
        factor: the factor rule's factor, > 0 (read with decode="factor").
        cache: Fast-dLLM's approximate KV cache: ``none``, ``prefix`` or ``dual`` (LLaDA, Dream, LLaDA-MoE).

    Every argument is checked before the first forward pass."""

    steps = gen_length if steps is None else steps
    policy = make_policy(model, decode, threshold, factor, cache)
    if teacher is not None:
        make_policy(teacher, decode, threshold, factor, cache)
    _check_eval_args(mask_ratio, nll_samples, seq_len, post_commit_prompts, _model_facts(model)[2])
    if teacher is not None or teacher_traces is not None:
        _check_decode(model, num_prompts, prompt_len, gen_length, block_length, steps)
    if teacher is not None and teacher.config.vocab_size != model.config.vocab_size:
        raise ValueError(f"teacher vocab_size ({teacher.config.vocab_size}) differs from the model's "
                         f"({model.config.vocab_size})")
    data = _held_out(texts)
    if teacher_traces is not None:
        _check_traces(teacher_traces, list(data), prompt_len, gen_length, block_length, steps, policy)
    elif teacher is not None:
        teacher_traces = _teacher_traces(teacher, tokenizer, data, num_prompts, prompt_len, gen_length, block_length,
                                         steps, seed, policy)
    per_text: dict[str, dict[str, float]] = {}
    parts = 1 + (0 if teacher_traces is None else 2 + (post_commit_prompts > 0))
    bar = tqdm(total=len(data) * parts, desc="evaluate", unit="part", leave=False)
    for name, dataset in data.items():
        windows = min(nll_samples, token_stream(dataset, tokenizer).numel() // seq_len)
        if windows < 1:
            raise ValueError(f"text {name!r} is shorter than one seq_len={seq_len} window")
        seqs = calibration_sequences(dataset, tokenizer, windows, seq_len, seed=seed)
        bar.set_postfix_str(name)
        per_text[name] = masked_nll(model, seqs, mask_ratio, seed, per_window=details)
        bar.update()
        if teacher_traces is not None:
            per_text[name].update(decode_metrics(model, teacher_traces[name], post_commit_prompts, details,
                                                 progress=lambda part: bar.update(), policy=policy))
        logger.info("evaluated %s: %s", name, {k: v for k, v in per_text[name].items() if not isinstance(v, list)})
    bar.close()
    metrics = {f"{name}/{key}": value for name, row in per_text.items() for key, value in row.items()}
    metrics.update(_pool(per_text))
    if policy != DecodePolicy():  # a served policy is named next to its numbers (tables, model cards)
        metrics["decode_policy"] = policy.name
    if return_traces:
        return metrics, dict(teacher_traces or {})
    return metrics


TIMING_KEYS = ("tokens_per_second", "decode_seconds")  # wall-clock: differ between runs of the same evaluation

HEADLINE = ("nll", "acc", "flip_rate", f"flip_rate_m{MARGIN:g}", "agreement", "steps_per_token", "decode_policy")


def table(rows: Mapping[str, Mapping[str, Any]], columns: Sequence[str] | None = None, transpose: bool = False,
          digits: int = 4) -> str:
    """Markdown table: one row per entry of ``rows`` (e.g. model name -> `evaluate` dict), one column per
    metric (``columns``; default every key, in first-seen order). ``transpose`` puts metrics on rows.
    Floats get ``digits`` significant digits; a missing value or nan prints as "-"."""
    if not rows:
        raise ValueError("table needs at least one row")
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows.values() for key in row))
    cells = {name: [_cell(row.get(col), digits) for col in columns] for name, row in rows.items()}
    if transpose:
        header = ["metric", *rows]
        body = [[col, *(cells[name][i] for name in rows)] for i, col in enumerate(columns)]
    else:
        header = ["model", *columns]
        body = [[name, *values] for name, values in cells.items()]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in line) + " |" for line in body]
    return "\n".join(lines)


def _cell(value: Any, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)
