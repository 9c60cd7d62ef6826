"""Issue 9's study in one command: does the frontier prior beat uniform weighting, and under which design?

    python benchmarks/study.py                    # the whole grid, about 2.5 hours on 2 CPU cores
    python benchmarks/study.py --quick --seeds 0  # every cell once at tiny settings (40 minutes)

Runs `benchmarks/methods.py` as parallel one-thread worker processes (one per core), each on a slice of
the grid (one seed and one group of cells), sharing the Stage I priors on disk (`--prior-cache`), then
merges every slice with `benchmarks/methods_report.py` into `<out>.md`, `<out>_pairs.json` and the plots.

The grid, on the shipped teacher, the same calibration and evaluation data in every cell:
- W4A4, base Hadamard rotation + GPTQ: uniform; the paper's prior; the prior's variants (reliability
  `margin` / `neg_entropy`; λ1 = 0 and 1; β = 0 and 3; blocks of 16; window 96 of 128; the window
  alone, `flat`; the in-window tilt alone, `floor1`); 128 instead of 64 calibration sequences;
- W4A4, the other bases: weighted GPTQ and the FlatQuant-style Stage II, uniform vs the paper's prior;
- Stage II inputs: text (the paper) vs decode-like masked states, uniform and fair, on Hadamard + GPTQ
  and FlatQuant-style;
- W4A8: Hadamard + GPTQ and FlatQuant-style, uniform vs the paper's prior.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from methods_report import PRIOR_VARIANTS  # benchmarks/ is this script's directory
from methods_report import main as report

HERE = Path(__file__).resolve().parent
VARIANTS = [f"fair-quarot-gptq-{v}" for v in PRIOR_VARIANTS]
BASES = ["gptq", "fair-gptq", "quarot-gptq", "fair-quarot-gptq", "quarot-gptq-masked", "fair-quarot-gptq-masked",
         "quarot-gptq-n128", "fair-quarot-gptq-n128"]
FLATQUANT = ["flatquant", "fair-flatquant", "flatquant-masked", "fair-flatquant-masked"]
W4A8 = ["quarot-gptq", "fair-quarot-gptq", "flatquant", "fair-flatquant"]


def slices(seeds: list[int]) -> list[tuple[str, list[str]]]:
    """(name, methods.py arguments) per worker job: one seed and one group of cells each, longest first."""
    jobs = []
    for seed in seeds:
        s = ["--seeds", str(seed)]
        jobs += [(f"flatquant-s{seed}", ["--bits", "w4a4", *s, "--methods", *FLATQUANT]),
                 (f"variants-s{seed}", ["--bits", "w4a4", *s, "--methods", *VARIANTS]),
                 (f"w4a8-s{seed}", ["--bits", "w4a8", *s, "--methods", *W4A8]),
                 (f"bases-s{seed}", ["--bits", "w4a4", *s, "--methods", *BASES])]
    return jobs


def run_slice(name: str, job_args: list[str], args: argparse.Namespace) -> Path:
    out = Path(args.work) / name
    quick = ["--quick"] if args.quick else []
    priors = Path(args.work) / ("priors-quick" if args.quick else "priors")  # quick priors are other settings
    cmd = [sys.executable, str(HERE / "methods.py"), "--threads", "1", "--num-samples", str(args.num_samples),
           "--num-prompts", str(args.num_prompts), "--post-commit-prompts", "1", "--out", str(out),
           "--prior-cache", str(priors), *quick, *job_args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(f"{out}.log", "w") as log:
        rc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
    if rc:
        raise RuntimeError(f"{' '.join(cmd)} exited with {rc}; see {out}.log")
    print(f"done: {name}", flush=True)
    return Path(f"{out}.json")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel one-thread processes")
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--quick", action="store_true", help="tiny settings (methods.py --quick)")
    p.add_argument("--work", default="runs/study", help="per-slice JSON and logs, shared priors")
    p.add_argument("--out", default="benchmarks/results/study")
    args = p.parse_args(argv)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    jobs = slices(args.seeds)
    with ThreadPoolExecutor(args.workers) as pool:
        results = list(pool.map(lambda job: run_slice(*job, args), jobs))
    report([*map(str, results), "--out", args.out])


if __name__ == "__main__":
    main()
