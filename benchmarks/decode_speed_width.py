"""How the serving speed-up grows with width: `decode_speed`'s headline on random LLaDA models wider than the
shipped teacher (issue 34's bound).

The shipped model is 3.7 M parameters (width 256): at that size the online rotations, activation quantization,
attention and the sampler cost as much as the int8 matmuls. This builds a randomly initialised LLaDA with the
teacher's vocabulary, tokenizer and mask id but ``--d-model`` / ``--layers`` / ``--heads`` / ``--mlp`` of
choice, quantizes it the way `decode_speed` quantizes the teacher (W4A4: RTN after a Hadamard rotation,
uniform weights, integer kernels; calibration text: lee), and times, interleaved in one process on the same
held-out prompts, the FP32 model decoding one token per step and both models under threshold + dual cache.
Reported: seconds (fastest of ``--repeats``), the speed-up over FP32 one-per-step within each repeat (median
[min, max]) and steps per token. Random weights make agreement meaningless; only speed is measured.

    OMP_NUM_THREADS=1 python benchmarks/decode_speed_width.py --threads 1 --d-model 1024 --layers 4 \\
        --heads 16 --mlp 2816 --num-prompts 4 --out benchmarks/results/decode_speed_width1024.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_speed import QUANTIZED, decode, paired_ratio  # noqa: E402
from machine import machine  # noqa: E402


def wide_models(d_model: int, layers: int, heads: int, mlp: int, seed: int) -> tuple[dict, object]:
    """{"fp32": random LLaDA of this shape, "w4a4": its quantized copy} and the shipped tokenizer."""
    import copy

    from transformers import AutoConfig, AutoModel, AutoTokenizer

    import optimum_fair
    from optimum_fair import FairCalibConfig, quantize
    from optimum_fair.data import load_texts

    path = optimum_fair.DEFAULT_MODEL
    config = AutoConfig.from_pretrained(path)
    config.update(dict(d_model=d_model, n_layers=layers, n_heads=heads, n_kv_heads=heads, mlp_hidden_size=mlp))
    torch.manual_seed(seed)
    fp = AutoModel.from_config(config, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    q = quantize(copy.deepcopy(fp), FairCalibConfig(**QUANTIZED["w4a4"]), texts=load_texts("lee"), tokenizer=tok)
    return {"fp32": fp, "w4a4": q.eval()}, tok


def cases(threshold: float) -> list[tuple[str, str, dict]]:
    dual = {"threshold": threshold, "cache": "dual"}
    return [("fp32", "one-per-step", {}), ("fp32", f"threshold {threshold:g} + dual", dual),
            ("w4a4", f"threshold {threshold:g} + dual", dual)]


def run(models: dict, prompts: torch.Tensor, gen_length: int, block_length: int, threshold: float,
        repeats: int) -> list[dict]:
    times: dict[tuple[str, str], list[float]] = {}
    steps: dict[tuple[str, str], float] = {}
    for _ in range(repeats):
        for name, label, policy in cases(threshold):
            trace, seconds = decode(models[name], prompts, gen_length, block_length, policy)
            times.setdefault((name, label), []).append(seconds)
            steps[(name, label)] = trace.steps_per_token()
    base = times[("fp32", "one-per-step")]
    rows = [dict(model=name, policy=label, seconds=round(min(times[(name, label)]), 3),
                 x_paired=paired_ratio(base, times[(name, label)]), steps_per_token=round(steps[(name, label)], 3),
                 each=[round(t, 3) for t in times[(name, label)]]) for name, label, _ in cases(threshold)]
    for r in rows:
        print(json.dumps(r), flush=True)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--mlp", type=int, default=2816)
    parser.add_argument("--num-prompts", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--gen-length", type=int, default=64)
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="also write rows, args and machine as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from optimum_fair.data import calibration_sequences, load_texts

    models, tok = wide_models(args.d_model, args.layers, args.heads, args.mlp, args.seed)
    params = sum(p.numel() for p in models["fp32"].parameters())
    prompts = calibration_sequences(load_texts("lee"), tok, args.num_prompts, args.prompt_len, seed=args.seed)
    info = {**machine(), "threads": torch.get_num_threads(), "torch": torch.__version__, "parameters": params}
    print(json.dumps(info), flush=True)
    rows = run(models, prompts, args.gen_length, args.block_length, args.threshold, args.repeats)
    if args.out:
        args.out.write_text(json.dumps({"machine": info, "args": vars(args) | {"out": str(args.out)}, "rows": rows},
                                       indent=1) + "\n")


if __name__ == "__main__":
    main()
