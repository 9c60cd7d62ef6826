"""Issue 9's study in one command: does the frontier prior beat uniform weighting, and under which design?

    python benchmarks/study.py                    # the grid, 3 seeds (about 90 minutes on 2 CPU cores)
    python benchmarks/study.py --extras           # + FlatQuant-style masked inputs and 128 calibration sequences
    python benchmarks/study.py --quick --seeds 0  # every cell once at tiny settings

Two phases of `benchmarks/methods.py` runs as parallel one-thread worker processes (one per core),
longest job first:
1. Stage I: the probe rollouts of each seed and rollout setting (reliability kind, block length,
   window), saved with their statistics in the prior cache (`--prior-cache`);
2. the cells, in groups of one seed and one bit width; each fair cell takes its seed's saved prior and
   Stage I re-weights it for the cell's β / λ1 / floor / frontier weight without new rollouts.
Every slice evaluates on the same teacher trajectories; one slice also scores the FP teacher. Then
`benchmarks/methods_report.py` merges the slices into `<out>.md`, `<out>_pairs.json` and the plots.

The grid, on the shipped teacher, the same calibration and evaluation data in every cell:
- W4A4 bases, uniform vs the paper's prior: weighted GPTQ, Hadamard rotation + GPTQ, FlatQuant-style;
- W4A4, the prior's variants on Hadamard + GPTQ: reliability `margin` / `neg_entropy`; λ1 = 0 and 1;
  β = 0 and 3; blocks of 16; window 96 of 128; the window alone (`flat`); the in-window tilt alone
  (`floor1`); β = 3 also on FlatQuant-style;
- Stage II inputs: text (the paper) vs decode-like masked states, uniform and fair, Hadamard + GPTQ;
- W4A8: Hadamard + GPTQ and FlatQuant-style, uniform vs the paper's prior;
- `--extras`: masked inputs on FlatQuant-style; 128 instead of 64 calibration sequences.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from methods_report import PRIOR_VARIANTS  # benchmarks/ is this script's directory
from methods_report import main as report

HERE = Path(__file__).resolve().parent
VARIANTS = [f"fair-quarot-gptq-{v}" for v in PRIOR_VARIANTS]
# (group name, bit width, cells, relative cost: FlatQuant-style calibration ~2x a GPTQ cell)
GROUPS: list[tuple[str, str, list[str], float]] = [
    ("bases", "w4a4", ["flatquant", "fair-flatquant", "gptq", "fair-gptq"], 6),
    ("w4a8", "w4a8", ["quarot-gptq", "fair-quarot-gptq", "flatquant", "fair-flatquant"], 6),
    ("masked", "w4a4", ["quarot-gptq", "fair-quarot-gptq", "quarot-gptq-masked", "fair-quarot-gptq-masked",
                        VARIANTS[0]], 5),
    ("variants", "w4a4", VARIANTS[1:6], 5),
    ("variants2", "w4a4", [*VARIANTS[6:], "fair-flatquant-beta3"], 6.5),
]
EXTRAS = [("extras", "w4a4", ["flatquant-masked", "fair-flatquant-masked", "quarot-gptq-n128",
                              "fair-quarot-gptq-n128"], 6)]
# one cell per distinct Stage I rollout setting (the rest re-weight these), relative cost ~ window^2
ROLLOUTS = [("default", "fair-quarot-gptq", 1), ("margin", "fair-quarot-gptq-margin", 1),
            ("negent", "fair-quarot-gptq-negent", 1), ("block16", "fair-quarot-gptq-block16", 1.2),
            ("window96", "fair-quarot-gptq-window96", 2.5)]


def slices(seeds: list[int], extras: bool = False) -> list[tuple[str, list[str], float]]:
    """(name, methods.py arguments, relative cost) of every cell job: one seed and one group each."""
    groups = GROUPS + (EXTRAS if extras else [])
    return [(f"{name}-s{seed}", ["--bits", bits, "--seeds", str(seed), "--methods", *cells], cost)
            for seed in seeds for name, bits, cells, cost in groups]


def prior_jobs(seeds: list[int]) -> list[tuple[str, list[str], float]]:
    """(name, methods.py arguments, relative cost) of every Stage I job: one seed and rollout setting each."""
    return [(f"priors-{name}-s{seed}", ["--priors-only", "--seeds", str(seed), "--methods", cell], cost)
            for seed in seeds for name, cell, cost in ROLLOUTS]


def run_job(name: str, job_args: list[str], args: argparse.Namespace) -> Path:
    out = Path(args.work) / name
    quick = ["--quick"] if args.quick else []
    priors = Path(args.work) / ("priors-quick" if args.quick else "priors")  # quick priors are other settings
    cmd = [sys.executable, str(HERE / "methods.py"), "--threads", "1", "--num-samples", str(args.num_samples),
           "--num-prompts", str(args.num_prompts), "--post-commit-prompts", str(args.post_commit_prompts),
           "--out", str(out), "--prior-cache", str(priors), *quick, *job_args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    start = time.perf_counter()
    with open(f"{out}.log", "w") as log:
        rc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
    if rc:
        raise RuntimeError(f"{' '.join(cmd)} exited with {rc}; see {out}.log")
    print(f"done: {name} ({time.perf_counter() - start:.0f} s)", flush=True)
    return Path(f"{out}.json")


def run_all(jobs: list[tuple[str, list[str], float]], args: argparse.Namespace) -> list[Path]:
    """Run the jobs on `args.workers` processes, costliest first (so the last ones to finish are short)."""
    jobs = sorted(jobs, key=lambda job: -job[2])
    with ThreadPoolExecutor(args.workers) as pool:
        return list(pool.map(lambda job: run_job(job[0], job[1], args), jobs))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel one-thread processes")
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--post-commit-prompts", type=int, default=1,
                   help="prompts per text whose own decode gets the leave-one-out post-commit mismatch; each adds "
                        "about 1 minute per cell, and a paired interval needs 4 or more (8 prompts per seed)")
    p.add_argument("--extras", action="store_true", help="also the cells of EXTRAS")
    p.add_argument("--quick", action="store_true", help="tiny settings (methods.py --quick)")
    p.add_argument("--work", default="runs/study", help="per-slice JSON and logs, shared priors")
    p.add_argument("--out", default="benchmarks/results/study")
    args = p.parse_args(argv)
    for name in ("workers", "num_samples", "num_prompts"):  # before 80 minutes of work, not in the last job
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.post_commit_prompts < 0:
        p.error(f"--post-commit-prompts must be >= 0, got {args.post_commit_prompts}")
    Path(args.work).mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    run_all(prior_jobs(args.seeds), args)
    cells = slices(args.seeds, args.extras)
    cells = [(name, [*job_args, *(["--skip-fp"] if i else [])], cost) for i, (name, job_args, cost) in enumerate(cells)]
    results = run_all(cells, args)
    report([*map(str, results), "--out", args.out])
    print(f"study: {len(cells)} cell jobs in {(time.perf_counter() - start) / 60:.0f} min")


if __name__ == "__main__":
    main()
