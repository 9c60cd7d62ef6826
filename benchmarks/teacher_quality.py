"""Quality of a (small) LLaDA teacher on held-out text: is it good enough to calibrate against?

Measures on two held-out domains, the gensim Wikipedia validation articles (``wiki-val``) and the
``lee`` news corpus:

* masked-token accuracy and NLL at mask ratio 0.5 over disjoint 128-token windows, against the best
  unigram guess (the most frequent token of the training stream) on the same masked positions;
* greedy LLaDA decoding (low-confidence remasking, temperature 0, 64 tokens in blocks of 32, one token
  per step) after 32-token held-out prompts: distinct-token ratio, longest run of one repeated token,
  commit margins;
* the full-precision stability lag delta_lag = t_align - t_commit over held-out decodes, with the
  post-commit top-1 read leave-one-out (re-mask only that position; the paper's section 5) and, for
  reference, raw (the untrained output at an unmasked position).

Usage::

    OMP_NUM_THREADS=1 python -m benchmarks.teacher_quality --model optimum_fair/assets/teacher \\
        --out out/teacher_quality.json --threads 1

``--model`` may also be a training checkpoint (``runs/teacher/checkpoint-*.pt``). Writes JSON to
``--out`` and prints a markdown table; exits 0 whether or not the bars are met (see ``"passes"``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from optimum_fair.data import calibration_sequences, token_stream
from optimum_fair.eval.metrics import stability_lag
from optimum_fair.modeling.tokens import require_mask_token
from optimum_fair.scoring.forward import forbid_mask, predict_window
from optimum_fair.scoring.sampler import llada_decode
from optimum_fair.scoring.trace import DecodeTrace
from scripts.train_teacher import TrainArgs, build_config, masked_eval

logger = logging.getLogger("teacher_quality")

DOMAINS = ("wiki-val", "lee")
BARS = {"accuracy_over_unigram": 3.0, "distinct_ratio": 0.5, "longest_run": 4}


def load_teacher(path: str | Path) -> tuple[torch.nn.Module, Any]:
    """An exported model directory (``save_pretrained``) or a training checkpoint ``.pt``, in float32."""
    from transformers import AutoModel, AutoTokenizer

    import optimum_fair  # noqa: F401  (registers the native model types)

    path = Path(path)
    if path.suffix == ".pt":
        from optimum_fair.modeling import LLaDAModelLM

        blob = torch.load(path, map_location="cpu", weights_only=True)
        tok = AutoTokenizer.from_pretrained(path.parent / "tokenizer")
        model = LLaDAModelLM(build_config(TrainArgs(**blob["args"]), tok))
        model.load_state_dict(blob["model"])
    elif (path / "config.json").is_file():
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path)
    else:
        raise FileNotFoundError(f"--model: expected a save_pretrained directory or a checkpoint .pt, got {path}")
    require_mask_token(tok)
    return model.float().eval(), tok


def logits_fn_of(model: torch.nn.Module) -> Callable[..., Tensor]:
    """x (batch, seq) -> float32 logits (batch, seq, vocab), no grad."""

    @torch.no_grad()
    def fn(x: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return model(input_ids=x, attention_mask=attention_mask).logits.float()

    return fn


def masked_quality(model: torch.nn.Module, tok: Any, domain: str, guess: int, windows: int,
                   seq_len: int) -> dict[str, float]:
    """Masked accuracy / NLL at ratio 0.5 vs the unigram guess on the same positions."""
    available = token_stream(domain, tok).numel() // seq_len
    seqs = calibration_sequences(domain, tok, min(windows, available), seq_len, seed=0)
    ev = masked_eval(model, seqs, require_mask_token(tok), ratio=0.5, seed=1234)
    unigram = (ev["targets"] == guess).float().mean().item()
    return {"windows": int(seqs.shape[0]), "n_masked": ev["n_masked"], "accuracy": ev["accuracy"],
            "nll": ev["nll"], "unigram_accuracy": unigram,
            "accuracy_over_unigram": ev["accuracy"] / max(unigram, 1e-9)}


def longest_run(row: list[int]) -> int:
    """Length of the longest run of one repeated token in ``row``."""
    best = cur = 1
    for a, b in itertools.pairwise(row):
        cur = cur + 1 if a == b else 1
        best = max(best, cur)
    return best


def decode_quality(trace: DecodeTrace, tok: Any, show: int = 3) -> dict[str, Any]:
    """Distinct-token ratio and longest run per decode, commit margins, a few decoded samples."""
    gen = trace.generated.tolist()
    runs = [longest_run(r) for r in gen]
    margin = trace.commit_margin.float()
    return {"decodes": len(gen), "distinct_ratio": distinct_ratio(gen),
            "distinct_ratio_min": min(len(set(r)) / len(r) for r in gen), "longest_run": max(runs),
            "longest_run_mean": sum(runs) / len(runs), "commit_margin_mean": margin.mean().item(),
            "commit_margin_lt_0.1": (margin < 0.1).float().mean().item(),
            "samples": [{"prompt": tok.decode(trace.sequences[i, : trace.prompt_len]),
                         "completion": tok.decode(gen[i])} for i in range(min(show, len(gen)))]}


@torch.no_grad()
def loo_top1_table(trace: DecodeTrace, logits_fn: Callable[..., Tensor], max_batch: int = 256) -> Tensor:
    """(steps, batch, gen) top-1 with committed positions read leave-one-out, swept backwards.

    delta_lag only depends on the last disagreement with the final token, so the sweep runs from
    the last step down and stops reading a position after its first disagreement (left at -1,
    which never equals a token). Still-masked positions use the plain prediction, as the sampler.
    """
    steps, (batch, gen_len) = trace.steps, trace.commit_step.shape
    final = trace.generated  # (batch, gen)
    table = torch.full((steps, batch, gen_len), -1, dtype=torch.long)
    alive = torch.ones(batch, gen_len, dtype=torch.bool)
    for step in reversed(range(steps)):
        state = trace.state_at(step)  # (batch, prompt + gen)
        masked = trace.masked_at(step)
        plain = forbid_mask(predict_window(logits_fn, state, None, trace.prompt_len, trace.logit_shift),
                            trace.mask_id).argmax(-1)  # (batch, gen)
        top = torch.where(masked & alive, plain, torch.full_like(plain, -1))
        for chunk in (alive & ~masked).nonzero().split(max_batch):
            rows, pos = chunk[:, 0], chunk[:, 1]
            idx = torch.arange(len(rows))
            probe = state[rows].clone()  # (n, prompt + gen)
            probe[idx, trace.prompt_len + pos] = trace.mask_id
            logits = predict_window(logits_fn, probe, None, trace.prompt_len, trace.logit_shift)
            top[rows, pos] = forbid_mask(logits[idx, pos], trace.mask_id).argmax(-1)
        table[step] = top
        alive &= top == final
        if not alive.any():
            break
    return table


def lag_summary(lags: Tensor) -> dict[str, Any]:
    """Histogram (value -> count), fraction > 0, mean and tail quantiles of delta_lag."""
    flat = lags.flatten()
    values, counts = flat.unique(sorted=True, return_counts=True)
    q = torch.quantile(flat.double(), torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64))
    return {"n": int(flat.numel()), "frac_positive": (flat > 0).float().mean().item(),
            "mean": flat.double().mean().item(), "p50": q[0].item(), "p90": q[1].item(), "p99": q[2].item(),
            "max": int(flat.max()), "histogram": {int(v): int(c) for v, c in zip(values, counts, strict=True)}}


def decode_domain(model: torch.nn.Module, tok: Any, domain: str,
                  args: argparse.Namespace) -> tuple[DecodeTrace, Tensor]:
    """Greedy low-confidence LLaDA decode after ``args.prompts`` held-out prompts of one domain.

    Returns the trace and the true continuations (prompts, gen_length) of the same windows.
    """
    windows = calibration_sequences(domain, tok, args.prompts, args.prompt_len + args.gen_length, seed=7)
    prompts, reference = windows[:, : args.prompt_len], windows[:, args.prompt_len :]
    trace = llada_decode(logits_fn_of(model), prompts, gen_length=args.gen_length,
                         block_length=args.block_length, steps=args.gen_length,
                         mask_id=require_mask_token(tok), temperature=0.0, remasking="low_confidence",
                         record_topk=True)
    return trace, reference


def distinct_ratio(rows: list[list[int]]) -> float:
    """Mean over rows of (distinct tokens / tokens)."""
    return sum(len(set(r)) / len(r) for r in rows) / len(rows)


def stability(model: torch.nn.Module, traces: list[DecodeTrace], per_domain: int) -> dict[str, Any]:
    """delta_lag over the first ``per_domain`` decodes of each domain: leave-one-out and raw."""
    fn = logits_fn_of(model)
    loo, raw = [], []
    for trace in traces:
        keep = list(range(min(per_domain, trace.batch_size)))
        sub = DecodeTrace(**{**trace.to_dict(), "sequences": trace.sequences[keep],
                             "commit_step": trace.commit_step[keep], "commit_margin": trace.commit_margin[keep],
                             "top1_token": trace.top1_token[:, keep], "top1_prob": trace.top1_prob[:, keep]})
        loo.append(stability_lag(sub, loo_top1_table(sub, fn)))
        raw.append(stability_lag(sub))
    return {"decodes": sum(int(x.shape[0]) for x in loo), "reading": "leave-one-out",
            "loo": lag_summary(torch.cat(loo)), "raw": lag_summary(torch.cat(raw))}


def check_bars(results: dict[str, Any]) -> dict[str, bool]:
    """Which quality bars each domain meets."""
    out = {}
    for dom in DOMAINS:
        r = results["domains"][dom]
        out[f"{dom}/accuracy>={BARS['accuracy_over_unigram']}x_unigram"] = (
            r["masked"]["accuracy_over_unigram"] >= BARS["accuracy_over_unigram"])
        out[f"{dom}/distinct_ratio>={BARS['distinct_ratio']}"] = r["decode"]["distinct_ratio"] >= BARS["distinct_ratio"]
        out[f"{dom}/longest_run<={BARS['longest_run']}"] = r["decode"]["longest_run"] <= BARS["longest_run"]
    return out


def markdown(results: dict[str, Any]) -> str:
    """The headline numbers as a markdown table."""
    rows = [("masked acc @ t=0.5", "masked", "accuracy", ".3f"),
            ("unigram guess acc", "masked", "unigram_accuracy", ".3f"),
            ("acc / unigram", "masked", "accuracy_over_unigram", ".1f"),
            ("masked NLL (nats)", "masked", "nll", ".3f"),
            ("distinct-token ratio (greedy)", "decode", "distinct_ratio", ".3f"),
            ("distinct-token ratio (true continuation)", "decode", "reference_distinct_ratio", ".3f"),
            ("longest repeated-token run (greedy)", "decode", "longest_run", "d"),
            ("mean commit margin", "decode", "commit_margin_mean", ".3f"),
            ("commits with margin < 0.1", "decode", "commit_margin_lt_0.1", ".2f")]
    lines = ["| metric | " + " | ".join(DOMAINS) + " |", "|---|" + "---|" * len(DOMAINS)]
    for label, part, key, fmt in rows:
        vals = [format(results["domains"][d][part][key], fmt) for d in DOMAINS]
        lines.append(f"| {label} | " + " | ".join(vals) + " |")
    lag = results.get("stability", {})
    for reading in ("loo", "raw") if lag else ():
        s = lag[reading]
        lines.append(f"| δ_lag > 0 ({reading}, {lag['decodes']} decodes) | {s['frac_positive']:.3f} "
                     f"(mean {s['mean']:.2f}, p90 {s['p90']:.0f}, max {s['max']}) | |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(Path(__file__).resolve().parents[1] / "optimum_fair/assets/teacher"))
    p.add_argument("--out", required=True, help="JSON output path")
    p.add_argument("--windows", type=int, default=256, help="masked-eval windows per domain")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--prompts", type=int, default=20, help="greedy decodes per domain")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--gen-length", type=int, default=64)
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--lag-decodes", type=int, default=16, help="decodes per domain for delta_lag (0: skip)")
    p.add_argument("--threads", type=int, default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    model, tok = load_teacher(args.model)
    guess = int(token_stream("wiki", tok).bincount().argmax())
    results: dict[str, Any] = {"model": str(args.model), "settings": vars(args).copy(),
                               "unigram_guess": {"id": guess, "token": tok.decode([guess])}, "domains": {}}
    traces = []
    for dom in DOMAINS:
        masked = masked_quality(model, tok, dom, guess, args.windows, args.seq_len)
        trace, reference = decode_domain(model, tok, dom, args)
        traces.append(trace)
        decode = decode_quality(trace, tok)
        decode["reference_distinct_ratio"] = distinct_ratio(reference.tolist())
        decode["reference_longest_run"] = max(longest_run(r) for r in reference.tolist())
        results["domains"][dom] = {"masked": masked, "decode": decode}
        logger.info("%s done (%.0f s)", dom, time.time() - t0)
    if args.lag_decodes > 0:
        results["stability"] = stability(model, traces, args.lag_decodes)
    results["passes"] = check_bars(results)
    results["seconds"] = round(time.time() - t0, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    table = markdown(results)
    print(table)
    print("passes:", json.dumps(results["passes"], indent=1))
    return results


if __name__ == "__main__":
    main()
