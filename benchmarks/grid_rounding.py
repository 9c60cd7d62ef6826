"""Plain rounding in llama.cpp's types: our grid search against llama-quantize's own, tensor by tensor.

    python benchmarks/grid_rounding.py                      # shipped model, Q4_0 Q4_K Q5_K Q6_K IQ4_NL IQ4_XS
    python benchmarks/grid_rounding.py --types Q4_K --out benchmarks/results/grid_rounding.json

Before GPTQ or any data: every matrix of the FP teacher (token embedding, block linears, head) is written
in type T twice, by `llama-quantize` (no importance matrix, every tensor forced to T with
`--token-embedding-type` / `--output-tensor-type` and `--pure`) and by our encoder (`gguf_types.encode`:
`ops.searched_scale` for the per-32 types, `grids.choose` for the others), both read back by the `gguf`
package's dequantizer. Reported per type: the summed squared error of each side over the tensors that
hold T (rows a multiple of 256 for the super-block types), the ratio ours / llama's with a 95 % bootstrap
interval over tensors, and how many tensors ours wins.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf_vs_llamacpp import run_tool, write_f32  # benchmarks/ is this script's directory
from machine import machine

import optimum_fair
from optimum_fair.enums import GGUFType
from optimum_fair.export.gguf_types import encode
from optimum_fair.grids import GRIDS, SUPER_BLOCK
from scripts.build_llama_cpp import build, default_cache

TYPES = ["Q4_0", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--types", nargs="+", default=TYPES, choices=TYPES)
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--resamples", type=int, default=2000)
    return p.parse_args(argv)


def tensors(path: Path) -> dict[str, tuple[str, torch.Tensor]]:
    """{gguf name: (type name, dequantized matrix (rows, K) float32)} of the 2-D tensors of a GGUF file."""
    out = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        if len(t.shape) == 2:
            k = int(t.shape[0])
            out[t.name] = (t.tensor_type.name, torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type),
                                                                         dtype=np.float32)).reshape(-1, k))
    return out


def ratio_interval(ours: np.ndarray, theirs: np.ndarray, resamples: int) -> list[float]:
    """95 % bootstrap interval over tensors of sum(ours) / sum(theirs)."""
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(ours), size=(resamples, len(ours)))
    ratios = ours[idx].sum(1) / theirs[idx].sum(1)
    return [float(np.quantile(ratios, 0.025)), float(np.quantile(ratios, 0.975))]


def compare(qtype: str, f32: dict, llama: dict, resamples: int) -> dict:
    rows = []
    for name, (_, w) in f32.items():
        their_type, theirs = llama[name]
        if their_type != qtype:  # llama.cpp fell back (width not a multiple of 256): not this type's test
            continue
        data, raw = encode(w, GGUFType(qtype))
        ours = torch.from_numpy(np.array(gguf.quants.dequantize(data, gguf.GGMLQuantizationType[raw]),
                                         dtype=np.float32)).reshape(w.shape)
        rows.append({"tensor": name, "ours": float(((ours - w) ** 2).sum()), "llama": float(((theirs - w) ** 2).sum())})
    o, t = np.array([r["ours"] for r in rows]), np.array([r["llama"] for r in rows])
    return {"type": qtype, "tensors": len(rows), "ours": float(o.sum()), "llama": float(t.sum()),
            "ratio": float(o.sum() / t.sum()), "ratio_ci95": ratio_interval(o, t, resamples),
            "ours_wins": int((o < t).sum()), "rows": rows}


def main(argv=None) -> None:
    args = parse_args(argv)
    cache = build(default_cache(), jobs=1)
    from transformers import AutoModel, AutoTokenizer

    teacher = AutoModel.from_pretrained(optimum_fair.DEFAULT_MODEL, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(optimum_fair.DEFAULT_MODEL)
    results = []
    with tempfile.TemporaryDirectory() as work:
        f32_path = write_f32(teacher, tok, Path(work) / "f32.gguf")
        f32 = tensors(f32_path)
        for qtype in args.types:
            out = Path(work) / f"{qtype}.gguf"
            run_tool(cache, "llama-quantize", "--pure", "--token-embedding-type", qtype.lower(),
                     "--output-tensor-type", qtype.lower(), str(f32_path), str(out), qtype, "1")
            r = compare(qtype, f32, tensors(out), args.resamples)
            results.append(r)
            lo, hi = r["ratio_ci95"]
            print(f"{qtype:7s} {r['tensors']:3d} tensors  ours {r['ours']:.4f}  llama-quantize {r['llama']:.4f}  "
                  f"ratio {r['ratio']:.4f} [{lo:.4f}, {hi:.4f}]  ours lower on {r['ours_wins']}", flush=True)
    report = {"machine": machine(), "model": "shipped teacher", "super_block": SUPER_BLOCK,
              "grids": sorted(t.value for t in GRIDS), "results": results}
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
