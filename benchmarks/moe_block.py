"""Stage II cost of one LLaDA-MoE-7B-shaped block on this machine, and a projection to a full run.

One random decoder layer with the released LLaDA-MoE-7B-A1B shapes (hidden 2048, 16 heads, 64 experts
of 1024, top-8, q/k norms) is calibrated by the library's own `calibrate_blocks` (GPTQ, W4A16 per
channel, no transform, uniform weights) on random hidden states, at two token counts. Wall time per block
is fitted as fixed + per-token (the block forwards and Hessians scale with tokens; GPTQ's factorizations
do not) and projected to the paper's 128 x 1,024 calibration tokens and 16 blocks. Peak memory is the
process's ru_maxrss. No GPU was used: the issue asks for a GPU run when one is lent; this is the CPU
estimate it allows otherwise.

    OMP_NUM_THREADS=2 python benchmarks/moe_block.py --threads 2 --tokens 16384 32768

Writes benchmarks/results/moe_block.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import machine  # noqa: E402
from optimum_fair.arch import LLADA_MOE  # noqa: E402
from optimum_fair.distributed import DataShard, World  # noqa: E402
from optimum_fair.enums import InputMode, Rounding, Transform, WeightGrid  # noqa: E402
from optimum_fair.modeling import LLaDAMoEConfig  # noqa: E402
from optimum_fair.modeling.modeling_lladamoe import LLaDAMoEDecoderLayer  # noqa: E402
from optimum_fair.pipeline.plan import StageTwoSettings  # noqa: E402
from optimum_fair.pipeline.stage2 import calibrate_blocks  # noqa: E402
from optimum_fair.pipeline.surgery import LayerFormat  # noqa: E402

SEQ = 1024
FULL = {"blocks": 16, "tokens": 128 * 1024}  # the paper's calibration set, LLaDA-MoE-7B's depth


class _Fallbacks(logging.Handler):
    """Counts the expert groups that had too few routed tokens for GPTQ (logged by Stage II)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += "round-to-nearest" in record.getMessage()


def one_block(tokens: int, seed: int) -> dict:
    """Calibrate one fresh random block on `tokens` random tokens; wall time and RTN fallbacks."""
    fallbacks = _Fallbacks()
    log = logging.getLogger("optimum_fair")
    log.setLevel(logging.INFO)
    log.addHandler(fallbacks)
    torch.manual_seed(seed)
    config = LLaDAMoEConfig(num_hidden_layers=1, vocab_size=1024)  # every other shape as released
    block = LLaDAMoEDecoderLayer(config, 0).eval()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.02) if p.dim() > 1 else torch.nn.init.ones_(p)
    n = tokens // SEQ
    hidden = torch.randn(n, SEQ, config.hidden_size)  # (n, seq, d)
    s = StageTwoSettings(fmt=LayerFormat(4, 16, -1, Transform.NONE, WeightGrid.FULL), rounding=Rounding.GPTQ,
                         epochs=0, lr=0.0, clip_lr=0.0, batch_size=4, damp=0.01, act_order=False,
                         input_mode=InputMode.QUANTIZED, seed=0, true_sequential=False, loss_samples=16,
                         compute_dtype=torch.float32)
    start = time.perf_counter()
    calibrate_blocks(torch.nn.ModuleList([block]), lambda l, b: LLADA_MOE.block_groups(b), hidden,
                     lambda b, l=0: ((), {}), None, s, torch.float32, torch.device("cpu"),
                     shard=DataShard(World(), n, s.batch_size))
    log.removeHandler(fallbacks)
    return {"tokens": tokens, "seconds": time.perf_counter() - start, "expert_groups": 64 * 2,
            "expert_groups_rtn_fallback": fallbacks.count}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, nargs=2, default=[16384, 32768], help="two calibration token counts")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/moe_block.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    runs = [one_block(t, seed=i) for i, t in enumerate(args.tokens)]
    (t1, s1), (t2, s2) = [(r["tokens"], r["seconds"]) for r in runs]
    per_token = (s2 - s1) / (t2 - t1)
    fixed = s1 - per_token * t1
    block_full = fixed + per_token * FULL["tokens"]
    report = {
        "machine": machine(), "threads": args.threads, "runs": runs,
        "fit": {"fixed_s": fixed, "per_1k_tokens_s": per_token * 1000},
        "projection": {"block_s": block_full, "run_h": block_full * FULL["blocks"] / 3600, **FULL},
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
