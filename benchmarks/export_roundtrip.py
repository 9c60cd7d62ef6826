"""The shipped model calibrated (GPTQ, transform none), exported to GGUF and compressed-tensors, and each
format read back by its consumer's package and scored on held-out text against the FP teacher.

    python benchmarks/export_roundtrip.py --out benchmarks/results/export_roundtrip.json

Rows per format (W4A16, W8A8): our checkpoint in our runtime (FairLinear, default kernels); the
compressed-tensors folder loaded by plain transformers + compressed-tensors; the GGUF file read back
with the `gguf` package (every tensor dequantized by its own dequantizer, q / k rows put back in
transformers' order) into a float LLaDA. Columns: file size, masked NLL on wiki-val, and the frontier
flip rate / greedy agreement against the teacher's trajectories (the package's `evaluate`).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from gguf_readback import gguf_readback  # benchmarks/ is this script's directory
from transformers import AutoModel, AutoTokenizer, CompressedTensorsConfig

import optimum_fair
from optimum_fair import FairCalibConfig
from optimum_fair.eval.evaluate import build_teacher_traces, evaluate
from optimum_fair.export import export

EVAL = dict(texts=("wiki-val",), num_prompts=8, prompt_len=64, gen_length=32, block_length=32, nll_samples=16,
            seq_len=128, post_commit_prompts=0)
FORMATS = {"W4A16": (4, 16), "W8A8": (8, 8)}


def size_mb(path: Path) -> float:
    files = [path] if path.is_file() else list(path.rglob("*.safetensors"))
    return round(sum(f.stat().st_size for f in files) / 2**20, 3)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    path = optimum_fair.DEFAULT_MODEL
    tok = AutoTokenizer.from_pretrained(path)
    teacher = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    traces = build_teacher_traces(teacher, tok, **{k: EVAL[k] for k in ("texts", "num_prompts", "prompt_len",
                                                                        "gen_length", "block_length")})
    rows = [{"format": "-", "model": "FP teacher", "size_mb": size_mb(Path(path) / "model.safetensors"),
             **evaluate(teacher, tok, teacher, teacher_traces=traces, **EVAL)}]
    work = Path(tempfile.mkdtemp())
    for name, (w, a) in FORMATS.items():
        start = time.time()
        config = FairCalibConfig(w_bits=w, a_bits=a, rounding="gptq", transform="none", weighting="uniform",
                                 dataset="wiki", num_samples=64, seq_len=128)
        AutoModel.from_pretrained(path, quantization_config=config).save_pretrained(work / name)  # fp16 scales
        calib_s = round(time.time() - start, 1)
        gguf_path = export(work / name, work / f"{name}.gguf", "gguf")
        ct_path = export(work / name, work / f"{name}-ct", "compressed-tensors")
        sides = {
            "ours (optimum-fair runtime)": (AutoModel.from_pretrained(work / name, dtype=torch.float32), work / name),
            "compressed-tensors, read by transformers": (AutoModel.from_pretrained(
                ct_path, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)),
                ct_path),
            "GGUF, read by the gguf package": (gguf_readback(gguf_path, work / name), gguf_path),
        }
        for label, (model, file) in sides.items():
            metrics = evaluate(model.eval(), tok, teacher, teacher_traces=traces, **EVAL)
            rows.append({"format": name, "model": label, "size_mb": size_mb(file), "calib_s": calib_s, **metrics})
            print(json.dumps(rows[-1]), flush=True)
    keys = ["wiki-val/nll", "wiki-val/flip_rate", "wiki-val/agreement"]
    print("| format | model | size MB | " + " | ".join(keys) + " |")
    print("|---|---|---|" + "---|" * len(keys))
    for r in rows:
        print(f"| {r['format']} | {r['model']} | {r['size_mb']} | "
              + " | ".join(f"{r.get(k, float('nan')):.4g}" for k in keys) + " |")
    if args.out:
        args.out.write_text(json.dumps({"eval": {k: list(v) if isinstance(v, tuple) else v for k, v in EVAL.items()},
                                        "torch_threads": args.threads, "rows": rows}, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
