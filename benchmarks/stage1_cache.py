"""Stage I rollouts of the shipped teacher with and without the prefix KV cache (issue 34, item 4).

The default one-liner's Stage I settings (sequence, window, blocks and steps as `decode_setup` resolves them,
compute dtype "auto", probe batches of 16), `--num-probes` probes: wall time of `probe_rollouts` uncached and
on the prefix cache (interleaved, fastest of `--repeats`), and the relative L2 distance between the two priors.

    OMP_NUM_THREADS=1 python benchmarks/stage1_cache.py --threads 1 --num-probes 64
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--num-probes", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threshold", type=float, default=None,
                        help="also build the prior under the serving policy (greedy threshold rollouts) and compare")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoModel, AutoTokenizer

    import optimum_fair
    from optimum_fair import FairCalibConfig
    from optimum_fair.arch import get_adapter
    from optimum_fair.data import calibration_sequences, load_texts
    from optimum_fair.devices import computing_in, resolve_compute_dtype
    from optimum_fair.modeling.kv_cache import ApproximateCache
    from optimum_fair.pipeline.plan import decode_setup
    from optimum_fair.scoring.prior import prior_from_rollouts, probe_rollouts

    model = AutoModel.from_pretrained(optimum_fair.DEFAULT_MODEL).eval()
    tok = AutoTokenizer.from_pretrained(optimum_fair.DEFAULT_MODEL)
    config = FairCalibConfig()
    setup = decode_setup(model, get_adapter(model), config)
    ids = calibration_sequences(load_texts(config.dataset), tok, args.num_probes, setup.seq_len, seed=1,
                                allow_overlap=True)
    prompts = ids[:, : setup.seq_len - setup.window]
    dtype = resolve_compute_dtype(config.compute_dtype, torch.device("cpu"))

    def run(cache, threshold=None):
        fn = lambda x, **kw: model(x, **kw).logits.float()  # noqa: E731
        start = time.perf_counter()
        with computing_in(model, dtype), torch.no_grad():
            out = probe_rollouts(fn, prompts, setup.window, setup.block_length, setup.steps, setup.mask_id,
                                 setup.logit_shift, "prob", 16, torch.Generator().manual_seed(0), cache=cache,
                                 threshold=threshold)
        return out, time.perf_counter() - start

    times = {"uncached": [], "prefix": []}
    for _ in range(args.repeats):
        plain, t_plain = run(None)
        cached, t_cached = run(ApproximateCache(model, "prefix"))
        times["uncached"].append(t_plain)
        times["prefix"].append(t_cached)
    kw = dict(seq_len=setup.seq_len, steps=setup.steps, beta=config.early_boost, schedule=config.boost_schedule,
              lambda1=1.0 / setup.steps, floor=config.floor)
    a, b = prior_from_rollouts(*plain, **kw).weights, prior_from_rollouts(*cached, **kw).weights
    result = {"machine": {**machine(), "threads": torch.get_num_threads(), "torch": torch.__version__},
              "setup": {"seq_len": setup.seq_len, "window": setup.window, "block_length": setup.block_length,
                        "steps": setup.steps, "num_probes": args.num_probes, "compute_dtype": str(dtype)},
              "seconds_uncached": round(min(times["uncached"]), 2), "seconds_prefix": round(min(times["prefix"]), 2),
              "speedup": round(min(times["uncached"]) / min(times["prefix"]), 2),
              "same_commit_steps": bool(torch.equal(plain[0], cached[0])),
              "prior_rel_l2": float((a - b).norm() / a.norm()), "prior_max_abs": float((a - b).abs().max())}
    if args.threshold is not None:  # the prior under the serving policy against the paper's random-commit prior
        served, t_served = run(None, args.threshold)
        c = prior_from_rollouts(*served, **kw).weights
        window = slice(setup.seq_len - setup.window, setup.seq_len)
        result["served"] = {"threshold": args.threshold, "seconds": round(t_served, 2),
                            "steps_per_token": round(sum(r.unique().numel() for r in served[0]) / served[0].numel(), 3),
                            "rel_l2_vs_random": float((c - a).norm() / a.norm()),
                            "window_random": [round(v, 3) for v in a[window].tolist()],
                            "window_served": [round(v, 3) for v in c[window].tolist()]}
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
