"""Wall time of `evaluate()` at its defaults on the shipped model, and where it goes.

    python benchmarks/evaluate_speed.py --threads 2 --out benchmarks/results/evaluate_speed.json

In one process, on the float32 teacher and its RTN W4A4 copy: the teacher's greedy trajectories
(`build_teacher_traces`, both texts), then `evaluate(model, tok, teacher_traces=...)` with every default
(and with ``post_commit_prompts`` = 0, 1, 2 to show the leave-one-out reading's share). Prints seconds and
the ratio to the issue's 90 s target; run it on a quiet machine (nothing else on the cores).
"""

from __future__ import annotations

import argparse
import inspect
import json
import time
from pathlib import Path

from machine import machine


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def run(args) -> dict:
    import torch
    from transformers import AutoModel, AutoTokenizer

    import optimum_fair
    from optimum_fair import FairCalibConfig
    from optimum_fair.eval.evaluate import build_teacher_traces, evaluate

    torch.set_num_threads(args.threads)
    teacher = AutoModel.from_pretrained(optimum_fair.DEFAULT_MODEL, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(optimum_fair.DEFAULT_MODEL)
    rtn = AutoModel.from_pretrained(optimum_fair.DEFAULT_MODEL, dtype=torch.float32,
                                    quantization_config=FairCalibConfig(rounding="rtn", transform="none")).eval()
    default_post = inspect.signature(evaluate).parameters["post_commit_prompts"].default
    traces, trace_s = timed(build_teacher_traces, teacher, tok)
    rows = {"teacher trajectories": {"seconds": trace_s}}
    for label, model in (("FP", teacher), ("RTN W4A4", rtn)):
        for post in sorted({0, 1, 2, default_post}):
            metrics, seconds = timed(evaluate, model, tok, teacher_traces=traces, post_commit_prompts=post)
            name = f"{label} evaluate(post_commit_prompts={post}{', default' if post == default_post else ''})"
            rows[name] = {"seconds": seconds, "flip_rate": metrics.get("flip_rate"),
                          "wiki-val/nll": metrics.get("wiki-val/nll")}
            print(f"{name}: {seconds:.1f} s", flush=True)
    return {**machine(), "threads": args.threads, "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/evaluate_speed.json"))
    args = p.parse_args()
    report = run(args)
    print("| step | seconds | / 90 s |\n|---|---|---|")
    for name, row in report["rows"].items():
        print(f"| {name} | {row['seconds']:.1f} | {row['seconds'] / 90:.2f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
