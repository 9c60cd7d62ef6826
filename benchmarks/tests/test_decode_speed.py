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


def test_the_width_benchmark_times_a_wider_random_llada(bench_module):
    dw = bench_module("decode_speed_width")
    models, tok = dw.wide_models(d_model=128, layers=2, heads=2, mlp=352, seed=0)
    assert models["fp32"].config.d_model == 128 and models["fp32"].config.vocab_size == len(tok)
    layer = models["w4a4"].model.transformer.blocks[0].ff_out
    assert (layer.in_features, layer.w_bits, layer.a_bits, layer.kernel) == (352, 4, 4, "int8_mm")
    rows = dw.run(models, torch.randint(4, 1000, (2, 8)), gen_length=8, block_length=4, threshold=0.5, repeats=2)
    assert [(r["model"], r["policy"]) for r in rows] == [("fp32", "one-per-step"), ("fp32", "threshold 0.5 + dual"),
                                                         ("w4a4", "threshold 0.5 + dual")]
    assert rows[0]["x_paired"] == "1.00 [1.00, 1.00]" and all(len(r["each"]) == 2 for r in rows)
