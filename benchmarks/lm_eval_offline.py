"""Offline lm-eval tasks on the shipped model: FP, RTN W4A4 and FAIR-Calib W4A4 through the optimum-fair backend.

    OMP_NUM_THREADS=1 python benchmarks/lm_eval_offline.py --out benchmarks/results/lm_eval_offline.json

Quantizes the shipped teacher twice (round-to-nearest; FAIR-Calib with a short config), saves both under
--work (default /tmp/fair_lm_eval, not the repo), writes the offline tasks there, then runs lm-eval's own CLI
through ``python -m optimum_fair.integrations.harness`` once per model (the command is stored in the JSON)
and reads lm-eval's results file. Accuracies get a Wilson 95 % interval from their n. About 30 minutes of
one thread of the 2-core AMD EPYC.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from machine import machine

MC_NUM, BATCH = 32, 32
FAIR = dict(num_probes=64, num_samples=64, epochs=5, seq_len=128, window=64)


def wilson(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a binomial proportion."""
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def quantized_models(work: Path) -> dict[str, tuple[str, float]]:
    """{label: (folder, seconds to quantize)}; the FP row is the shipped folder itself."""
    from transformers import AutoModel, AutoTokenizer

    import optimum_fair
    from optimum_fair import FairCalibConfig, quantize
    from optimum_fair.export import save_quantized

    tok = AutoTokenizer.from_pretrained(optimum_fair.DEFAULT_MODEL)
    out = {"FP (fp32)": (optimum_fair.DEFAULT_MODEL, 0.0)}
    configs = {"RTN W4A4": ("rtn-w4a4", FairCalibConfig(rounding="rtn", transform="none")),
               "FAIR-Calib W4A4": ("fair-w4a4", FairCalibConfig(**FAIR))}
    for label, (name, config) in configs.items():
        model = AutoModel.from_pretrained(optimum_fair.DEFAULT_MODEL, dtype=torch.float32).eval()
        start = time.perf_counter()
        quantize(model, config, tokenizer=tok)
        seconds = time.perf_counter() - start
        save_quantized(model, work / name, tok, overwrite=True)
        out[label] = (str(work / name), seconds)
    return out


def run_tasks(folder: str, tasks_dir: Path, out_dir: Path) -> tuple[list[str], dict, float]:
    """lm-eval's CLI on the offline tasks; (command, lm-eval's results JSON, seconds)."""
    command = [sys.executable, "-m", "optimum_fair.integrations.harness", "--model", "optimum-fair",
               "--model_args", f"pretrained={folder},mc_num={MC_NUM},batch_size={BATCH},seed=1234",
               "--include_path", str(tasks_dir), "--tasks", "fair_offline", "--output_path", str(out_dir)]
    start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "lm_eval.log", "w") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    seconds = time.perf_counter() - start
    newest = max(out_dir.rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
    return command, json.loads(newest.read_text()), seconds


def summarise(results: dict) -> dict[str, dict]:
    """{task: {metric: value, metric_ci95: [lo, hi] for accuracies, n}}."""
    rows = {}
    for task, metrics in results["results"].items():
        n = int(results["n-samples"][task]["effective"])
        row: dict = {"n": n}
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if not isinstance(value, (int, float)) or "_stderr" in metric:
                continue
            name = metric if filt in ("", "none") else f"{metric}@{filt}"
            row[name] = value
            if metric in ("acc", "acc_norm", "exact_match"):
                row[f"{name}_ci95"] = list(wilson(value * n, n))
        rows[task] = row
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/fair_lm_eval"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/lm_eval_offline.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    from optimum_fair.eval.tasks import write_tasks

    args.work.mkdir(parents=True, exist_ok=True)
    tasks_dir = write_tasks(args.work / "tasks")
    report = {**machine(), "threads": 1, "mc_num": MC_NUM,
              "batch_size": BATCH, "fair_config": FAIR, "models": {}}
    for label, (folder, quant_seconds) in quantized_models(args.work).items():
        command, results, seconds = run_tasks(folder, tasks_dir, args.work / "results" / label.split()[0])
        report["models"][label] = {"quantize_seconds": round(quant_seconds, 1), "eval_seconds": round(seconds, 1),
                                   "command": " ".join(command[1:]), "tasks": summarise(results)}
        print(label, json.dumps(report["models"][label]["tasks"]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
