"""benchmarks/gguf_pool.py on the committed Q4_0 runs: it reproduces the pooled numbers docs/export.md states."""

from __future__ import annotations

from pathlib import Path


def test_two_seeds_pool_as_documented(bench_module):
    gguf_pool = bench_module("gguf_pool")
    results = Path(__file__).resolve().parents[1] / "results"
    rows = gguf_pool.runs([str(results / "gguf_vs_llamacpp.json"), str(results / "gguf_vs_llamacpp_seed1.json")])
    p = gguf_pool.pooled(rows["optimum-fair Q4_0 fair, llama.cpp's mix"], rows["llama-quantize Q4_0 + imatrix"])
    assert p["seeds"] == [0, 1]
    assert round(p["ratio"], 2) == 0.84 and p["ci"][1] < 0  # 0.84x, -1.79 pts [-3.26, -0.36]
    assert p["nll_diff"]["wiki-val"] < 0 and p["nll_diff"]["lee"] < 0
