"""benchmarks/gguf_pool.py on the committed Q4_0 runs: it reproduces the pooled numbers docs/export.md states."""

from __future__ import annotations

from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1]  # benchmarks/


@pytest.fixture
def gguf_pool(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import gguf_pool

    return gguf_pool


def test_two_seeds_pool_as_documented(gguf_pool):
    rows = gguf_pool.runs([str(BENCH / "results" / f) for f in ("gguf_vs_llamacpp.json",
                                                                "gguf_vs_llamacpp_seed1.json")])
    p = gguf_pool.pooled(rows["optimum-fair Q4_0 fair, llama.cpp's mix"], rows["llama-quantize Q4_0 + imatrix"])
    assert p["seeds"] == [0, 1]
    assert round(p["ratio"], 2) == 0.84 and p["ci"][1] < 0  # 0.84x, -1.79 pts [-3.26, -0.36]
    assert p["nll_diff"]["wiki-val"] < 0 and p["nll_diff"]["lee"] < 0
