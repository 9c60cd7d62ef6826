"""The weight grid at W4A4: `weight_grid="full"` (max|w|/7.5) against version 1's "symmetric" (max|w|/7).

    python benchmarks/weight_grid.py --threads 1 --out benchmarks/results/weight_grid_w4a4.json

The shipped model, quantized by the quickstart's FAIR-Calib W4A4 config (FlatQuant-style, 64 probes, 64
samples, 5 epochs) for several seeds, and by QuaRot-style GPTQ (Hadamard + GPTQ), each on both grids with
the same seed; every model scored against the same FP teacher trajectories (8 prompts per text, as the
quickstart). Prints the per-seed values and the mean paired difference full - symmetric per metric.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from machine import machine

METRICS = ("wiki-val/nll", "lee/nll", "flip_rate", "flip_rate_m0.1", "agreement")
CASES = {"FAIR-Calib W4A4 (FlatQuant-style)": dict(num_probes=64, num_samples=64, epochs=5, seq_len=128, window=64),
         "QuaRot-GPTQ W4A4": dict(rounding="gptq", transform="hadamard", num_probes=64, num_samples=64, seq_len=128,
                                  window=64)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--gptq-seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    import torch
    from transformers import AutoModel, AutoTokenizer

    import optimum_fair
    from optimum_fair import FairCalibConfig
    from optimum_fair.eval.evaluate import build_teacher_traces, evaluate

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    path = optimum_fair.DEFAULT_MODEL
    teacher = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    traces = build_teacher_traces(teacher, tok, num_prompts=8)
    report = {"machine": machine(), "threads": args.threads, "cases": {}}
    for case, cfg in CASES.items():
        seeds = args.gptq_seeds if "GPTQ" in case else args.seeds
        rows = {}
        for seed in seeds:
            for grid in ("full", "symmetric"):
                model = AutoModel.from_pretrained(path, dtype=torch.float32, quantization_config=FairCalibConfig(
                    weight_grid=grid, seed=seed, **cfg))
                r = evaluate(model, tok, teacher_traces=traces, num_prompts=8, post_commit_prompts=0)
                rows[f"{grid} s{seed}"] = {k: float(r[k]) for k in METRICS}
                print(case, grid, seed, rows[f"{grid} s{seed}"], flush=True)
        diff = {k: statistics.fmean(rows[f"full s{s}"][k] - rows[f"symmetric s{s}"][k] for s in seeds) for k in METRICS}
        report["cases"][case] = {"seeds": seeds, "rows": rows, "mean_full_minus_symmetric": diff}
        print(case, "mean full - symmetric:", {k: round(v, 4) for k, v in diff.items()}, flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
