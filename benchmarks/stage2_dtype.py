"""Stage II in bfloat16 vs float32 on the shipped teacher: time, and how far the calibrated models move.

    OMP_NUM_THREADS=1 python benchmarks/stage2_dtype.py --threads 1 --out benchmarks/results/stage2_dtype.json

`FairCalibConfig.compute_dtype` sets the dtype of the blocks' forwards in Stage II (the FP targets, the
inputs the GPTQ Hessians and the transforms' statistics are taken from, the quantized stream and the
learned transforms' training steps) as well as Stage I's. The weights stay float32 (autocast); the
Hessians, the GPTQ solves and the rounding are float32 / float64 either way.

For two jobs, each run once per compute dtype (float32 and the machine's `fast_dtype`) in this process
from the same loaded teacher:

* "GPTQ W4A16": GPTQ, no transform, uniform weighting, 128 x 128-token "wiki" windows (the job of
  benchmarks/llmcompressor_gptq.py);
* "FAIR-Calib W4A4": FlatQuant-style transforms, 15 epochs, the fair weighting from one prior built
  once in float32 and shared by both runs (so only Stage II differs), `--num-samples` windows;

it prints Stage II's wall time (the `quantize` call, tokenising included), each model's relative logit
error ||logits_q - logits_FP|| / ||logits_FP|| on 32 held-out "wiki-val" windows with half their
positions masked, the masked NLL and flip rate of `evaluate()` against the teacher's trajectories (no
post-commit reading), and how far the bf16 run lands from the fp32 run, ||logits_bf16 - logits_fp32|| /
||logits_fp32 - logits_FP|| (a share of the fp32 run's own error: GPTQ's rounding decisions flip under
any small change of the Hessians, so this is large even where the quality columns agree).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from machine import machine


def jobs(args) -> dict:
    from optimum_fair import FairCalibConfig

    gptq = dict(w_bits=4, a_bits=16, rounding="gptq", transform="none", weighting="uniform", num_samples=128,
                seq_len=128, dataset="wiki", batch_size=4, seed=0)
    fair = dict(w_bits=4, a_bits=4, num_samples=args.num_samples, epochs=args.epochs, seq_len=128, window=64,
                seed=0)
    return {"GPTQ W4A16": lambda dtype, prior: FairCalibConfig(**gptq, compute_dtype=dtype),
            "FAIR-Calib W4A4": lambda dtype, prior: FairCalibConfig(**fair, prior=prior, compute_dtype=dtype)}


def heldout_logits(model, ids):
    import torch

    with torch.no_grad():
        return torch.cat([model(ids[i:i + 8]).logits.float() for i in range(0, ids.shape[0], 8)])


def run(args) -> dict:
    import torch
    from transformers import AutoModel, AutoTokenizer

    import optimum_fair
    from optimum_fair import FairCalibConfig, build_prior, quantize
    from optimum_fair.data import calibration_sequences
    from optimum_fair.devices import fast_dtype
    from optimum_fair.eval.evaluate import build_teacher_traces, evaluate

    torch.set_num_threads(args.threads)
    teacher = AutoModel.from_pretrained(optimum_fair.DEFAULT_MODEL, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(optimum_fair.DEFAULT_MODEL)
    traces = build_teacher_traces(teacher, tok, num_prompts=args.num_prompts)
    held = calibration_sequences("wiki-val", tok, 32, 128, seed=1)  # (32, 128)
    held = held.masked_fill(torch.rand(held.shape, generator=torch.Generator().manual_seed(1234)) < 0.5, 3)
    fp_logits = heldout_logits(teacher, held)
    fast = str(fast_dtype(torch.device("cpu"))).removeprefix("torch.")
    rows = {}
    with tempfile.TemporaryDirectory() as prior_dir:
        build_prior(teacher, FairCalibConfig(num_probes=args.num_probes, seq_len=128, window=64,
                                             compute_dtype="float32"), tok).save(prior_dir)
        for job, make in jobs(args).items():
            logits = {}
            for name in dict.fromkeys(["float32", fast]):
                model = AutoModel.from_pretrained(optimum_fair.DEFAULT_MODEL, dtype=torch.float32)
                start = time.perf_counter()
                quantize(model, make(name, prior_dir), tokenizer=tok)
                seconds = time.perf_counter() - start
                m = evaluate(model.eval(), tok, teacher_traces=traces, num_prompts=args.num_prompts,
                             post_commit_prompts=0)
                logits[name] = heldout_logits(model, held)
                rows[f"{job} / {name}"] = {"job": job, "compute_dtype": name, "stage2_s": seconds,
                                           "rel_logit_error": float((logits[name] - fp_logits).norm()
                                                                    / fp_logits.norm()),
                                           "nll": m["nll"], "flip_rate": m["flip_rate"],
                                           "flip_rate_m0.1": m["flip_rate_m0.1"]}
            if fast != "float32":
                own_error = (logits["float32"] - fp_logits).norm()
                rows[f"{job} / {fast}"]["logit_shift_over_error"] = float(
                    (logits[fast] - logits["float32"]).norm() / own_error)
                rows[f"{job} / {fast}"]["time_ratio"] = (rows[f"{job} / {fast}"]["stage2_s"]
                                                          / rows[f"{job} / float32"]["stage2_s"])
    return {"rows": rows, "settings": vars(args), "machine": machine(), "torch": torch.__version__,
            "fast_dtype": fast}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--num-probes", type=int, default=128)
    p.add_argument("--num-samples", type=int, default=128)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    out = run(args)
    print(f"machine: {out['machine']}")
    print("| job | compute dtype | Stage II s | time / fp32 | rel. logit error | masked NLL | flip rate | "
          "flip m0.1 | shift from fp32 / its error |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in out["rows"].values():
        ratio = f"{r['time_ratio']:.2f}" if "time_ratio" in r else "1"
        shift = f"{r['logit_shift_over_error']:.3f}" if "logit_shift_over_error" in r else "-"
        print(f"| {r['job']} | {r['compute_dtype']} | {r['stage2_s']:.1f} | {ratio} | {r['rel_logit_error']:.4f} | "
              f"{r['nll']:.4f} | "
              f"{r['flip_rate']:.4f} | {r['flip_rate_m0.1']:.4f} | {shift} |")
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
