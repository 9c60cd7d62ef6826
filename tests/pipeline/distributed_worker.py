"""One rank of data-parallel calibrations, launched by tests/pipeline/test_distributed.py (torchrun, accelerate).

    python tests/distributed_worker.py MODEL_DIR OUT_DIR JOBS_JSON

JOBS_JSON is a list of {"name", "entry", "config"}: entry "from_pretrained" (the quantization_config
hook) or "quantize", config the FairCalibConfig keyword arguments. For each job every rank writes
OUT_DIR/name/rank{r}.json (world size, prior, calibration records) and rank 0 alone saves the model to
OUT_DIR/name/model. FAIR_TEST_FAULT="die:L" ("hang:L", "skew:L") makes rank 1 exit abruptly (sleep,
perturb its copy of the block's weights) when it reaches Stage II block L. A job named "collectives"
exercises `World`'s collectives alone and writes OUT_DIR/collectives{r}.json.
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
    from optimum_fair.pipeline import stage2 as calibrate

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

    from optimum_fair import FairCalibConfig, calibration_result, quantize
    from optimum_fair.distributed import get_world, is_main_process

    cfg = FairCalibConfig(**config)
    if entry == "from_pretrained":
        model = AutoModel.from_pretrained(model_dir, quantization_config=cfg)
    else:
        tok = AutoTokenizer.from_pretrained(model_dir)
        model = quantize(AutoModel.from_pretrained(model_dir), cfg, tokenizer=tok)
    world = get_world()
    out.mkdir(parents=True, exist_ok=True)
    result = calibration_result(model)
    record = {"rank": world.rank, "size": world.size, "records": result.blocks,
              "prior": None if result.prior is None else result.prior.weights.tolist()}
    (out / f"rank{world.rank}.json").write_text(json.dumps(record))
    if is_main_process():
        model.save_pretrained(out / "model")


def collectives(out_dir: str) -> None:
    """Uneven gathers, a fold whose float result depends on its order, max, and a disagreement."""
    from optimum_fair.distributed import DistributedError, get_world

    world = get_world()
    r = world.rank
    rows = world.gather_rows(torch.arange(3.0) if r == 0 else torch.zeros(0))  # rank 1 holds nothing
    # rounds of (rank 0, rank 1) parts: (1, 1e16), (-1e16, absent), (absent, absent); in order the sum is
    # (1 + 1e16) - 1e16 = 0 in float64, any other order gives 1 or 2
    rounds = [((1.0, True), (1e16, True)), ((-1e16, True), (5.0, False)), ((7.0, False), (7.0, False))]
    acc = None
    for parts in rounds:
        value, present = parts[r]
        acc = world.fold(acc, torch.tensor([value], dtype=torch.float64), present)
    mx = world.all_reduce_max(torch.tensor([float(r), -float(r)]))
    try:
        world.check_identical(torch.tensor([r]), "rank number")
        caught = ""
    except DistributedError as err:
        caught = str(err)
    result = {"rows": [g.tolist() for g in rows], "fold": acc.tolist(), "max": mx.tolist(), "caught": caught}
    (Path(out_dir) / f"collectives{r}.json").write_text(json.dumps(result))
    torch.save(toy_hessian(world), Path(out_dir) / f"hessian{r}.pt")
    torch.save(toy_expert_hessians(world), Path(out_dir) / f"expert_hessians{r}.pt")


def toy_hessian(world):
    """group_hessian of a toy linear over 12 samples in batches of 4 (3 batches: rank 0 holds two)."""
    from torch import nn

    from optimum_fair.calib import CalibLinear, TransformParams
    from optimum_fair.distributed import DataShard
    from optimum_fair.pipeline.stats import group_hessian

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(12, 8, 16, generator=g) * 3, torch.rand(8, generator=g)  # (n, seq, d), (seq,)
    block = nn.Sequential(nn.Linear(16, 16))
    calib = CalibLinear(block[0], TransformParams(16, kron="none", act_clip=False, trainable=False), 4, 4)
    shard = DataShard(world, 12, 4)
    return group_hessian(block, "0", calib, block, x[shard.sample_ids], w, shard)


class ToyMoE(torch.nn.Module):
    """x (b, seq, 16) -> top-2 of 4 experts (one linear each), routed by a linear router."""

    def __init__(self):
        from optimum_fair.modeling.experts import RoutedExperts

        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.gate = torch.nn.Linear(16, 4, bias=False)
        self.experts = RoutedExperts(torch.nn.Sequential(torch.nn.Linear(16, 16)) for _ in range(4))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))

    def forward(self, x):
        flat = x.reshape(-1, 16)
        weights, index = torch.topk(self.gate(flat).softmax(-1), 2, dim=-1)
        return self.experts(flat, index, weights).reshape(x.shape)


def toy_expert_hessians(world):
    """counted_hessians of the 4 experts of `ToyMoE` over 12 samples in batches of 4, prior-weighted."""
    from optimum_fair.calib import CalibLinear, TransformParams
    from optimum_fair.distributed import DataShard
    from optimum_fair.pipeline.stats import counted_hessians

    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(12, 8, 16, generator=g), torch.rand(12, 8, generator=g)  # (n, seq, d), (n, seq)
    block = ToyMoE()
    names = [f"experts.{e}.0" for e in range(4)]
    calibs = [CalibLinear(block.get_submodule(n), TransformParams(16, kron="none", act_clip=False, trainable=False),
                          4, 16) for n in names]
    shard = DataShard(world, 12, 4)
    hessians, counts = counted_hessians(block, names, calibs, block, x[shard.sample_ids], w[shard.sample_ids], shard)
    return {"hessians": hessians, "counts": counts}


def main(model_dir: str, out_dir: str, jobs_json: str) -> None:
    if os.environ.get("FAIR_TEST_FAULT"):
        _inject_fault(os.environ["FAIR_TEST_FAULT"])
    for job in json.loads(jobs_json):
        if job["name"] == "collectives":
            collectives(out_dir)
        else:
            run_job(model_dir, Path(out_dir) / job["name"], job["entry"], job["config"])


if __name__ == "__main__":
    main(*sys.argv[1:4])
