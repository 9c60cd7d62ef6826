"""The evidence table: FP vs RTN, QuaRot-style, GPTQ, FlatQuant-style and FAIR-Calib on the shipped model.

Every method calibrates on the same calibration sequences (same seed) and is evaluated on the same
held-out text and the same teacher trajectories. Each quantized cell is run for several seeds (the
seed moves the calibration samples, the probe prompts and the random rotations); the table reports
mean ± half-range over seeds.

    python benchmarks/methods.py                          # full table (about an hour on 2 CPU cores)
    python benchmarks/methods.py --quick                  # a minute: tiny settings, one seed
    python benchmarks/methods.py --methods rtn fair-gptq --bits w4a4 --seeds 0

Writes JSON (every metric of every run, with per-prompt flip counts and δ_lag lists) and a markdown
table; `benchmarks/methods_report.py` merges one or more such JSON files into the README table, the
paired bootstrap intervals (fair vs uniform) and the PNG plots. Deterministic methods (RTN) run once.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import shutil
import statistics
import time
from pathlib import Path

import torch
from methods_report import HEADLINE, summarise  # benchmarks/ is this script's directory

import optimum_fair
from optimum_fair import FairCalibConfig, calibration_result, quantize
from optimum_fair.eval.evaluate import build_teacher_traces, evaluate, table

# name -> FairCalibConfig fields; "fp" is the unquantized teacher. Fair cells weight with early boost
# beta = 1 (the package default; set in calib_config) unless they name another, as "fair-flatquant-beta3"
METHODS: dict[str, dict] = {
    "rtn": dict(rounding="rtn", transform="none", weighting="uniform"),
    "quarot-rtn": dict(rounding="rtn", transform="hadamard", weighting="uniform"),
    "gptq": dict(rounding="gptq", transform="none", weighting="uniform"),
    "fair-gptq": dict(rounding="gptq", transform="none", weighting="fair"),
    "quarot-gptq": dict(rounding="gptq", transform="hadamard", weighting="uniform"),
    "fair-quarot-gptq": dict(rounding="gptq", transform="hadamard", weighting="fair"),
    "flatquant": dict(rounding="rtn", transform="flatquant", weighting="uniform"),
    "fair-flatquant": dict(rounding="rtn", transform="flatquant", weighting="fair"),
    # the paper's ablation (its section 6) on the paper's base: one prior term at a time
    "frontier-flatquant": dict(rounding="rtn", transform="flatquant", weighting="fair", reliability_weight=0.0),
    "reliability-flatquant": dict(rounding="rtn", transform="flatquant", weighting="fair", frontier_weight=0.0),
}
# issue 9's study: variants of the prior and of Stage II's inputs on one base (Hadamard rotation + GPTQ),
# each compared with the uniform-weighting cell of the same base ("quarot-gptq", or "quarot-gptq-masked");
# decode-like inputs also on the paper's base
_BASE = {"rounding": "gptq", "transform": "hadamard", "weighting": "fair"}
STUDY: dict[str, dict] = {
    "fair-quarot-gptq-margin": {**_BASE, "reliability": "margin"},
    "fair-quarot-gptq-negent": {**_BASE, "reliability": "neg_entropy"},
    "fair-quarot-gptq-lambda0": {**_BASE, "reliability_weight": 0.0},  # frontier term only
    "fair-quarot-gptq-lambda1": {**_BASE, "reliability_weight": 1.0},  # reliability dominant (default 1/T)
    "fair-quarot-gptq-beta0": {**_BASE, "early_boost": 0.0},
    "fair-quarot-gptq-beta3": {**_BASE, "early_boost": 3.0},
    "fair-quarot-gptq-block16": {**_BASE, "block_length": 16},
    "fair-quarot-gptq-window96": {**_BASE, "window": 96},  # the whole sequence but one block of prompt
    # what the prior does, split in two: its shape inside the window (weight 1 outside it), and the window
    # alone (flat inside: constant lambda_0 and no reliability term make every frontier-hit total 1)
    "fair-quarot-gptq-floor1": {**_BASE, "floor": 1.0},
    "fair-quarot-gptq-flat": {**_BASE, "early_boost": 0.0, "reliability_weight": 0.0},
    # calibration length: twice the calibration sequences, uniform and fair
    "quarot-gptq-n128": {**_BASE, "weighting": "uniform", "num_samples": 128},
    "fair-quarot-gptq-n128": {**_BASE, "num_samples": 128},
    "quarot-gptq-masked": {**_BASE, "weighting": "uniform", "calib_inputs": "masked"},
    "fair-quarot-gptq-masked": {**_BASE, "calib_inputs": "masked"},
    # decode-like inputs on the paper's base (FlatQuant-style Stage II)
    "flatquant-masked": {**METHODS["flatquant"], "calib_inputs": "masked"},
    "fair-flatquant-masked": {**METHODS["fair-flatquant"], "calib_inputs": "masked"},
    # the strongest early boost of the variants on the paper's base
    "fair-flatquant-beta3": {**METHODS["fair-flatquant"], "early_boost": 3.0},
}
METHODS.update(STUDY)
# fields that change Stage I's probe rollouts: cells that agree on them (and the seed) share one set of
# rollouts; Stage I re-weights a saved prior for the other prior fields (beta, lambda_1, floor, ...)
ROLLOUT_FIELDS = ("reliability", "block_length", "window")
BITS = {"w4a4": (4, 4), "w4a8": (4, 8), "w8a8": (8, 8), "w4a16": (4, 16)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=optimum_fair.DEFAULT_MODEL)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--bits", nargs="+", default=["w4a4"], choices=list(BITS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--num-samples", type=int, default=128)
    p.add_argument("--num-probes", type=int, default=128)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--gen-length", type=int, default=64)
    p.add_argument("--post-commit-prompts", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke run")
    p.add_argument("--out", default="benchmarks/results/methods")
    p.add_argument("--prior-cache", default=None,
                   help="directory of Stage I priors shared by runs and processes (default: runs/priors/<settings>)")
    p.add_argument("--priors-only", action="store_true",
                   help="only build (or find) the Stage I priors the fair cells need, one per seed and rollout setting")
    p.add_argument("--skip-fp", action="store_true", help="no FP teacher row (another slice of the same grid has it)")
    args = p.parse_args(argv)
    if args.quick:
        args.num_samples, args.num_probes, args.epochs, args.num_prompts, args.seeds = 8, 8, 1, 4, args.seeds[:1]
        args.post_commit_prompts = 1
    if args.prior_cache is None:
        settings = f"{Path(args.model).name}-n{args.num_samples}-p{args.num_probes}-L{args.seq_len}-K{args.window}"
        args.prior_cache = str(Path("runs/priors") / settings)
    return args


def calib_config(args, method: str, bits: str, seed: int, prior_dir: str | None) -> FairCalibConfig:
    w_bits, a_bits = BITS[bits]
    fields = {"w_bits": w_bits, "a_bits": a_bits, "seed": seed, "num_samples": args.num_samples,
              "num_probes": args.num_probes, "seq_len": args.seq_len, "window": args.window, "epochs": args.epochs,
              "dataset": "wiki", "batch_size": 4, "early_boost": 1.0,  # the cells' beta: the default before issue 9
              **METHODS[method]}  # a method's own fields win
    if fields["weighting"] == "fair" and prior_dir:
        fields["prior"] = prior_dir  # the same Stage I prior for every fair cell of this seed and prior
    return FairCalibConfig(**fields)


def prior_key(method: str, seed: int) -> str:
    """Name of the Stage I rollouts a fair cell uses: the seed and the rollout-changing fields."""
    parts = [f"{k}={METHODS[method][k]}" for k in ROLLOUT_FIELDS if k in METHODS[method]]
    return "-".join([f"seed{seed}", *parts]).replace("=", "").replace(".", "p")


def prior_path(args, key: str) -> Path:
    return Path(args.prior_cache) / f"prior-{key}"


def cached_prior(args, key: str) -> str | None:
    """The prior a run (this process or another) already stored under `key`, if any."""
    path = prior_path(args, key)
    return str(path) if path.is_dir() else None


def store_prior(args, key: str, prior) -> None:
    """Save under `key`, atomically: write a private directory, then rename it into place (first one wins)."""
    path = prior_path(args, key)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    prior.save(tmp)
    try:
        os.rename(tmp, path)
    except OSError:  # another process stored the same prior meanwhile
        shutil.rmtree(tmp)


def run_cell(args, teacher, tok, traces, method, bits, seed) -> dict:
    model = copy.deepcopy(teacher)
    key = prior_key(method, seed)
    cfg = calib_config(args, method, bits, seed, cached_prior(args, key))
    start = time.perf_counter()
    quantize(model, cfg, tokenizer=tok)
    seconds = time.perf_counter() - start
    if cfg.weighting == "fair" and cfg.prior is None:
        store_prior(args, key, calibration_result(model).prior)
    metrics = evaluate_row(args, model, tok, traces)
    metrics["calib_seconds"] = seconds
    return metrics


def build_priors(args, teacher, tok) -> None:
    """Stage I for every seed and rollout setting the selected fair cells need, stored in the prior cache."""
    from optimum_fair.pipeline.stage1 import build_prior

    for seed in args.seeds:
        for method in args.methods:
            key = prior_key(method, seed)
            cfg = calib_config(args, method, args.bits[0], seed, None)
            if cfg.weighting != "fair" or cached_prior(args, key):
                continue
            start = time.perf_counter()
            store_prior(args, key, build_prior(teacher, cfg, tok))
            logging.info("Stage I %s: %.0f s", key, time.perf_counter() - start)


def evaluate_row(args, model, tok, traces) -> dict:
    """evaluate(), plus the per-text decode metrics averaged over the held-out texts."""
    m = evaluate(model, tok, teacher_traces=traces, num_prompts=args.num_prompts, gen_length=args.gen_length,
                 seq_len=args.seq_len, seed=0, post_commit_prompts=args.post_commit_prompts, details=True)
    for short, key in (("set_disagreement", "frontier_set_disagreement"),
                       ("mean_disagree", "post_commit_mean_disagree"), ("never_agree", "post_commit_never_agree")):
        vals = [v for k, v in m.items() if k.endswith("/" + key)]
        if vals:
            m[short] = statistics.fmean(vals)
    return m


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from transformers import AutoModel, AutoTokenizer

    teacher = AutoModel.from_pretrained(args.model).eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    if args.priors_only:
        build_priors(args, teacher, tok)
        return
    traces = build_teacher_traces(teacher, tok, num_prompts=args.num_prompts, gen_length=args.gen_length)
    runs = [] if args.skip_fp else [{"method": "fp", "bits": "-", "seed": None,
                                     "metrics": evaluate_row(args, teacher, tok, traces)}]
    for bits in args.bits:
        for method in args.methods:
            deterministic = METHODS[method]["rounding"] == "rtn" and METHODS[method]["transform"] == "none"
            for seed in args.seeds[:1] if deterministic else args.seeds:
                metrics = run_cell(args, teacher, tok, traces, method, bits, seed)
                runs.append({"method": method, "bits": bits, "seed": seed, "metrics": metrics})
                logging.info("%s %s seed %d: %s", method, bits, seed,
                             {k: round(v, 4) for k, v in metrics.items() if k in HEADLINE})
                Path(f"{args.out}.json").write_text(json.dumps({"args": vars(args), "runs": runs}, indent=1))
    summary = summarise(runs)
    text = table(summary, columns=HEADLINE)
    Path(f"{args.out}.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
