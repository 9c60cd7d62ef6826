"""One rank of data-parallel calibrations, launched by tests/test_distributed.py (torchrun, accelerate).

    python tests/distributed_worker.py MODEL_DIR OUT_DIR JOBS_JSON

JOBS_JSON is a list of {"name", "entry", "config"}: entry "from_pretrained" (the quantization_config
hook) or "quantize", config the FairCalibConfig keyword arguments. For each job every rank writes
OUT_DIR/name/rank{r}.json (world size, prior, calibration records) and rank 0 alone saves the model to
OUT_DIR/name/model. FAIR_TEST_FAULT="die:L" ("hang:L", "skew:L") makes rank 1 exit abruptly (sleep,
perturb its copy of the block's weights) when it reaches Stage II block L.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)


def _inject_fault(spec: str) -> None:
    """Rank 1 dies (os._exit, no cleanup: a crash or OOM kill), hangs or diverges when it reaches block L."""
    from optimum_fair import calibrate

    kind, block = spec.split(":")
    original = calibrate._one_block

    def one_block(l, *args, **kwargs):
        if l == int(block) and int(os.environ.get("RANK", 0)) == 1:
            if kind == "die":
                os._exit(7)
            if kind == "hang":
                time.sleep(600)
            block_module = args[0]
            with torch.no_grad():
                next(block_module.parameters()).add_(1e-3)
        return original(l, *args, **kwargs)

    calibrate._one_block = one_block


def run_job(model_dir: str, out: Path, entry: str, config: dict) -> None:
    from transformers import AutoModel, AutoTokenizer

    from optimum_fair import FairCalibConfig, quantize
    from optimum_fair.distributed import get_world, is_main_process

    cfg = FairCalibConfig(**config)
    if entry == "from_pretrained":
        model = AutoModel.from_pretrained(model_dir, quantization_config=cfg)
    else:
        tok = AutoTokenizer.from_pretrained(model_dir)
        model = quantize(AutoModel.from_pretrained(model_dir), cfg, tokenizer=tok)
    world = get_world()
    out.mkdir(parents=True, exist_ok=True)
    record = {"rank": world.rank, "size": world.size, "records": model.fair_calibration_log,
              "prior": model.fair_prior.weights.tolist() if hasattr(model, "fair_prior") else None}
    (out / f"rank{world.rank}.json").write_text(json.dumps(record))
    if is_main_process():
        model.save_pretrained(out / "model")


def main(model_dir: str, out_dir: str, jobs_json: str) -> None:
    if os.environ.get("FAIR_TEST_FAULT"):
        _inject_fault(os.environ["FAIR_TEST_FAULT"])
    for job in json.loads(jobs_json):
        run_job(model_dir, Path(out_dir) / job["name"], job["entry"], job["config"])


if __name__ == "__main__":
    main(*sys.argv[1:4])
