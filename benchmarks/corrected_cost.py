"""What `input_mode="corrected"` costs: the GGUF one-liner on the shipped model with each input mode,
interleaved in one process (so both sides see the same machine), on a quiet machine.

    python benchmarks/corrected_cost.py --threads 2 --out benchmarks/results/corrected_cost.json

Each repeat loads the shipped model with `FairCalibConfig(gguf_type=T, rounding="gptq", weighting="uniform",
calib_inputs="masked", input_mode=M)` for M = quantized, then corrected; prints each side's times and the
ratio of the medians with the range of the per-repeat ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from machine import machine

MODES = ("quantized", "corrected")


def one_run(gguf_type: str, mode: str) -> float:
    from transformers import AutoModel

    import optimum_fair
    from optimum_fair import FairCalibConfig

    config = FairCalibConfig(gguf_type=gguf_type, rounding="gptq", weighting="uniform", calib_inputs="masked",
                             input_mode=mode, tokenizer=optimum_fair.DEFAULT_MODEL)
    start = time.perf_counter()
    AutoModel.from_pretrained(optimum_fair.DEFAULT_MODEL, quantization_config=config)
    return time.perf_counter() - start


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--type", default="Q4_K_M")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    seconds: dict[str, list[float]] = {m: [] for m in MODES}
    for _ in range(args.repeats):
        for mode in MODES:
            seconds[mode].append(one_run(args.type, mode))
    ratios = [c / q for q, c in zip(seconds["quantized"], seconds["corrected"], strict=True)]
    median = {m: statistics.median(v) for m, v in seconds.items()}
    result = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}, "seconds": seconds,
              "median_s": median, "ratio": median["corrected"] / median["quantized"],
              "ratio_range": [min(ratios), max(ratios)]}
    print(f"{args.type}: quantized {median['quantized']:.1f} s, corrected {median['corrected']:.1f} s, "
          f"x{result['ratio']:.2f} (per repeat {min(ratios):.2f}-{max(ratios):.2f}), {machine()['cpu']}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
