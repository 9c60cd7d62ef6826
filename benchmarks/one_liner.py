"""Wall time of the default one-liner on the shipped model, split by stage, with the top ops of Stage II.

    python benchmarks/one_liner.py --threads 2 --out benchmarks/results/one_liner.json

Times, in one process on a quiet machine:
* ``AutoModel.from_pretrained(DEFAULT_MODEL, dtype=float32, quantization_config=FairCalibConfig())``, the
  line a user writes (every default: 512 Stage I probes, FlatQuant-style W4A4, 128 x seq_len samples, 15
  epochs);
* Stage I alone (`build_prior` with the same config) on a fresh float32 teacher, so Stage II is the
  difference;
* with ``--profile``, a torch profiler table of one Stage II block on 16 samples for 2 epochs (the ten ops
  with most CPU time; the full defaults produce too many events to tabulate).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from machine import machine


def run(args) -> dict:
    import torch
    from transformers import AutoModel, AutoTokenizer

    import optimum_fair
    from optimum_fair import FairCalibConfig, build_prior

    torch.set_num_threads(args.threads)
    config = FairCalibConfig()
    tok = AutoTokenizer.from_pretrained(optimum_fair.DEFAULT_MODEL)
    teacher = AutoModel.from_pretrained(optimum_fair.DEFAULT_MODEL, dtype=torch.float32).eval()
    start = time.perf_counter()
    build_prior(teacher, config, tok)
    stage1 = time.perf_counter() - start
    print(f"Stage I alone: {stage1:.1f} s", flush=True)
    start = time.perf_counter()
    AutoModel.from_pretrained(optimum_fair.DEFAULT_MODEL, dtype=torch.float32, quantization_config=config)
    total = time.perf_counter() - start
    print(f"one-liner: {total:.1f} s (Stage II and loading ~{total - stage1:.1f} s)", flush=True)
    out = {**machine(), "threads": args.threads, "config": config.to_dict(), "one_liner_seconds": round(total, 1),
           "stage1_seconds": round(stage1, 1), "stage2_and_load_seconds": round(total - stage1, 1)}
    if args.profile:
        out["stage2_profile"] = profile_one_block(tok)
    return out


def profile_one_block(tok) -> str:
    """The profiler's op table for Stage II of a one-block copy of the shipped model (uniform weighting)."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoModel

    import optimum_fair
    from optimum_fair import FairCalibConfig, quantize
    from optimum_fair.arch import get_adapter

    model = AutoModel.from_pretrained(optimum_fair.DEFAULT_MODEL, dtype=torch.float32).eval()
    blocks = get_adapter(model).block_list(model)
    del blocks[1:]
    # the defaults' Stage II on 16 samples for 2 epochs: the same ops, few enough events to tabulate
    one = FairCalibConfig(weighting="uniform", num_samples=16, epochs=2)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        quantize(model, one, tokenizer=tok)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10)
    print(table, flush=True)
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/one_liner.json"))
    args = p.parse_args()
    report = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
