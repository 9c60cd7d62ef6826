"""GPTQ's two Hessian schedules and two compute dtypes on the shipped teacher: time, reconstruction, flips.

    OMP_NUM_THREADS=1 python benchmarks/gptq_schedules.py --threads 1 --out benchmarks/results/gptq_schedules.json

`FairCalibConfig.true_sequential`: False (default) takes every linear group's Hessian from one pass of
the float block over the quantized stream, as llm-compressor does; True runs one pass per group with
the earlier groups already quantized (AutoGPTQ's `true_sequential`). For W4A16 (no transform) and
W4A4 (Hadamard), uniform weighting, 128 x 128-token "wiki" windows, seeds `--seeds`, and each of
`--compute-dtypes` (the blocks' forwards: "auto" is bfloat16 on a CPU with avx512_bf16 / AMX), in one process:
the `quantize` wall time, the relative logit error against the FP teacher on 32 held-out "wiki-val"
windows with half their positions masked, and `evaluate()`'s masked NLL and flip rate against the
teacher's trajectories (16 prompts per text, no post-commit reading). The seed moves only which
windows are drawn; one seed's flip rate resolves about 1.5-2 points. The seed-to-seed spread of a
setting is the yardstick for the differences between schedules and dtypes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from machine import machine

JOBS = {"W4A16": dict(a_bits=16, transform="none"), "W4A4 Hadamard": dict(a_bits=4, transform="hadamard")}


def run(args) -> dict:
    import torch
    from transformers import AutoModel, AutoTokenizer

    import optimum_fair
    from optimum_fair import FairCalibConfig, quantize
    from optimum_fair.data import calibration_sequences
    from optimum_fair.eval.evaluate import build_teacher_traces, evaluate

    torch.set_num_threads(args.threads)
    teacher = AutoModel.from_pretrained(optimum_fair.DEFAULT_MODEL, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(optimum_fair.DEFAULT_MODEL)
    traces = build_teacher_traces(teacher, tok, num_prompts=16)
    held = calibration_sequences("wiki-val", tok, 32, 128, seed=1)  # (32, 128)
    held = held.masked_fill(torch.rand(held.shape, generator=torch.Generator().manual_seed(1234)) < 0.5, 3)
    with torch.no_grad():
        fp = teacher(held).logits.float()
    rows = []
    settings = [(job, seed, ts, dtype) for job in JOBS for seed in args.seeds for ts in (False, True)
                for dtype in args.compute_dtypes]
    for job, seed, true_sequential, dtype in settings:
        model = AutoModel.from_pretrained(optimum_fair.DEFAULT_MODEL, dtype=torch.float32)
        cfg = FairCalibConfig(w_bits=4, rounding="gptq", weighting="uniform", num_samples=128, seq_len=128,
                              dataset="wiki", seed=seed, true_sequential=true_sequential, compute_dtype=dtype,
                              **JOBS[job])
        start = time.perf_counter()
        quantize(model, cfg, tokenizer=tok)
        seconds = time.perf_counter() - start
        with torch.no_grad():
            err = float((model.eval()(held).logits.float() - fp).norm() / fp.norm())
        m = evaluate(model, tok, teacher_traces=traces, num_prompts=16, post_commit_prompts=0)
        rows.append({"job": job, "seed": seed, "true_sequential": true_sequential, "compute_dtype": dtype,
                     "seconds": seconds, "rel_logit_error": err, "nll": m["nll"], "flip_rate": m["flip_rate"]})
    return {"rows": rows, "settings": vars(args), "machine": machine(), "torch": torch.__version__}


def summary(rows: list[dict]) -> list[dict]:
    """Per job, schedule and dtype: the mean over seeds and the range (max - min) across them."""
    out = []
    keys = dict.fromkeys((r["job"], r["true_sequential"], r["compute_dtype"]) for r in rows)
    for job, ts, dtype in keys:
        mine = [r for r in rows if (r["job"], r["true_sequential"], r["compute_dtype"]) == (job, ts, dtype)]
        entry = {"job": job, "true_sequential": ts, "compute_dtype": dtype, "seeds": len(mine)}
        for k in ("seconds", "rel_logit_error", "nll", "flip_rate"):
            values = [r[k] for r in mine]
            entry[k], entry[k + "_range"] = statistics.fmean(values), max(values) - min(values)
        out.append(entry)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--compute-dtypes", nargs="+", default=["auto", "float32"])
    p.add_argument("--out", default=None)
    args = p.parse_args()
    out = run(args)
    out["summary"] = summary(out["rows"])
    print(f"machine: {out['machine']}")
    print("| job | Hessians | compute dtype | quantize s | rel. logit error (range) | masked NLL (range) | "
          "flip rate (range) |")
    print("|---|---|---|---|---|---|---|")
    for r in out["summary"]:
        schedule = "per group (true_sequential=True)" if r["true_sequential"] else "one pass (default)"
        cells = " | ".join(f"{r[k]:.4f} ({r[k + '_range']:.4f})" for k in ("rel_logit_error", "nll", "flip_rate"))
        print(f"| {r['job']} | {schedule} | {r['compute_dtype']} | {r['seconds']:.1f} | {cells} |")
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
