"""Stage I in bfloat16 vs float32 on the shipped teacher: time against its bound, and what changes.

    python benchmarks/stage1_dtype.py --threads 1 --out benchmarks/results/stage1_dtype.json

For each compute dtype (float32 and the machine's `fast_dtype`, bfloat16 on a CPU with avx512_bf16 /
AMX), in one process, on the float32 teacher:

* Stage I alone (`build_prior`, `--num-probes` probes, the config's decode settings): its wall time and
  its bound, batches x T x the median time of one batched teacher forward at the same batch and dtype
  (probe rollouts are T forwards per batch; nothing else is counted in the bound);
* the prior's max relative difference |w_bf16 - w_fp32| / w_fp32 over positions;
* then Stage II from each prior (FlatQuant-style W4A4, `--num-samples`, `--epochs`, same seed) and
  `evaluate()` against the FP teacher's trajectories: masked NLL and flip rate (no post-commit reading).

Prints one table and the ratios bf16 / fp32 (time) and achieved / bound.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from machine import machine


def forward_ms(model, batch: int, seq_len: int, dtype, repeats: int = 5) -> float:
    """Median ms of one teacher forward on (batch, seq_len) random ids, computed in dtype."""
    import torch

    from optimum_fair.devices import computing_in

    x = torch.randint(4, model.config.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    times = []
    with torch.no_grad(), computing_in(model, dtype):
        for i in range(repeats + 1):
            start = time.perf_counter()
            model(x).logits.float()
            if i:
                times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def run(args) -> dict:
    import torch
    from transformers import AutoModel, AutoTokenizer

    import optimum_fair
    from optimum_fair import FairCalibConfig, build_prior, quantize
    from optimum_fair.devices import fast_dtype
    from optimum_fair.eval.evaluate import build_teacher_traces, evaluate

    torch.set_num_threads(args.threads)
    teacher = AutoModel.from_pretrained(optimum_fair.DEFAULT_MODEL, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(optimum_fair.DEFAULT_MODEL)
    traces = build_teacher_traces(teacher, tok, num_prompts=args.num_prompts)
    fast = str(fast_dtype(torch.device("cpu"))).removeprefix("torch.")
    base = dict(num_probes=args.num_probes, num_samples=args.num_samples, epochs=args.epochs, seq_len=128,
                window=64)
    rows, priors = {}, {}
    for name in dict.fromkeys(["float32", fast]):
        cfg = FairCalibConfig(**base, compute_dtype=name)
        start = time.perf_counter()
        prior = build_prior(teacher, cfg, tok)
        seconds = time.perf_counter() - start
        steps = prior.settings["steps"]
        batches = -(-args.num_probes // max(cfg.batch_size, 16))
        bound = batches * steps * forward_ms(teacher, max(cfg.batch_size, 16), 128, getattr(torch, name)) / 1e3
        priors[name] = prior
        with tempfile.TemporaryDirectory() as tmp:
            prior.save(tmp)
            model = AutoModel.from_pretrained(optimum_fair.DEFAULT_MODEL, dtype=torch.float32)
            quantize(model, FairCalibConfig(**base, prior=tmp, compute_dtype=name), tokenizer=tok)
        metrics = evaluate(model, tok, teacher_traces=traces, num_prompts=args.num_prompts, post_commit_prompts=0)
        rows[name] = {"stage1_s": seconds, "bound_s": bound, "achieved_over_bound": seconds / bound,
                      "nll": metrics["nll"], "flip_rate": metrics["flip_rate"],
                      "flip_rate_m0.1": metrics["flip_rate_m0.1"]}
    ref = priors["float32"].weights
    out = {"rows": rows, "settings": vars(args), "machine": machine(),
           "torch": torch.__version__, "fast_dtype": fast}
    if fast != "float32":
        out["prior_max_rel_diff"] = float(((priors[fast].weights - ref).abs() / ref).max())
        out["time_ratio_fast_over_fp32"] = rows[fast]["stage1_s"] / rows["float32"]["stage1_s"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--num-probes", type=int, default=128)
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    out = run(args)
    print("| compute dtype | Stage I s | bound s | achieved / bound | masked NLL | flip rate | flip m0.1 |")
    print("|---|---|---|---|---|---|---|")
    for name, r in out["rows"].items():
        print(f"| {name} | {r['stage1_s']:.1f} | {r['bound_s']:.1f} | {r['achieved_over_bound']:.2f} | "
              f"{r['nll']:.4f} | {r['flip_rate']:.4f} | {r['flip_rate_m0.1']:.4f} |")
    for key in ("prior_max_rel_diff", "time_ratio_fast_over_fp32"):
        if key in out:
            print(f"{key}: {out[key]:.4g}")
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
