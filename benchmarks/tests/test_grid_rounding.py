"""The pure part of benchmarks/grid_rounding.py (no llama.cpp): the per-type comparison and its interval."""

from __future__ import annotations

import gguf
import numpy as np
import torch


def test_compare_counts_only_tensors_of_the_type_and_wins(bench_module):
    grid_rounding = bench_module("grid_rounding")
    g = torch.Generator().manual_seed(0)
    f32, theirs = {}, {}
    for i in range(6):
        w = torch.randn(16, 256, generator=g) * (i + 1)
        f32[f"t{i}"] = ("F32", w)
        q = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q4_0)  # llama.cpp's reference Q4_0
        back = torch.from_numpy(np.array(gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q4_0))).reshape(w.shape)
        theirs[f"t{i}"] = ("Q4_0" if i < 5 else "Q5_0", back)  # t5: a fallback, left out
    r = grid_rounding.compare("Q4_0", f32, theirs, resamples=200)
    assert r["tensors"] == 5 and r["ours_wins"] == 5  # searched scales: never worse than the reference
    assert r["ratio"] < 0.95 and r["ratio_ci95"][0] <= r["ratio"] <= r["ratio_ci95"][1]
