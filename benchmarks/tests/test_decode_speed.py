"""benchmarks/decode_speed.py: speed-ups are paired within each repeat, and a small run fills every column."""

from __future__ import annotations

import torch


def test_the_speed_up_is_paired_round_by_round(bench_module):
    ds = bench_module("decode_speed")
    # per repeat 10/2 = 5, 4/2 = 2, 6/1 = 6: median 5, not min(base) / min(times) = 4
    assert ds.paired_ratio([10.0, 4.0, 6.0], [2.0, 2.0, 1.0]) == "5.00 [2.00, 6.00]"


def test_a_small_run_fills_the_table(bench_module):
    ds = bench_module("decode_speed")
    models, tok = ds.load_models(["fp32"])
    prompts = torch.randint(4, 1000, (2, 8))
    rows = ds.run(models, prompts, gen_length=8, block_length=4, threshold=0.5, repeats=2)
    assert [r["policy"] for r in rows] == ["one-per-step", "threshold 0.5", "threshold 0.5 + prefix",
                                           "threshold 0.5 + dual"]
    base = rows[0]
    assert base["x_paired"] == "1.00 [1.00, 1.00]" and base["agree_fp_one_per_step"] == 1.0
    assert rows[1]["agree_fp_same_rule"] == 1.0 and rows[1]["flip_rate"] == 0.0  # the same decode as its reference
    for r in rows:
        assert len(r["each"]) == 2 and abs(r["seconds"] - min(r["each"])) <= 5e-4  # the fastest repeat
        assert 0 < r["steps_per_token"] <= 1.0
    assert ds.markdown(rows).count("\n") == 1 + len(rows)
