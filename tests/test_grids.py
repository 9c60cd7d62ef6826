"""llama.cpp's K-quant grids (`optimum_fair.grids`): the search, the exact write-back through `gguf`'s own
dequantizer, GPTQ inside the grid, and the Q4_K_M mix's per-linear types (issue 31)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from optimum_fair.calib.gptq import gptq_quantize_k
from optimum_fair.enums import GGUFType
from optimum_fair.export.gguf_types import encode, layer_blocks, layer_type
from optimum_fair.grids import (
    GRIDS,
    K_GRIDS,
    asymmetric_grid,
    choose,
    linear_type,
    round_codes,
    two_level,
    use_more_bits,
    values,
)
from optimum_fair.nn import FairLinear

T = gguf.GGMLQuantizationType


def _weights(out=16, n=512, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, n, generator=g) * torch.rand(out, 1, generator=g) + 0.3 * torch.rand(out, 1, generator=g)


def _gguf(data: np.ndarray, qtype: GGUFType, shape) -> torch.Tensor:
    return torch.from_numpy(np.array(gguf.quants.dequantize(data, T[qtype.value]))).reshape(shape)


@pytest.mark.parametrize("qtype", list(GRIDS))
def test_grid_codes_write_back_exactly_through_gguf(qtype):
    grid, w = GRIDS[qtype], _weights()
    scale, mins = choose(grid, w)
    codes = round_codes(grid, w, scale, mins)
    lo, hi = grid.code_range
    assert int(codes.min()) >= lo and int(codes.max()) <= hi
    ours = values(grid, codes, scale, mins)
    assert torch.equal(_gguf(layer_blocks(codes, scale, mins, grid.group, qtype), qtype, w.shape), ours)
    assert ((ours - w).norm() / w.norm()) < {4: 0.12, 5: 0.06, 6: 0.03}[grid.bits]


def test_q5_0_codes_write_back_exactly_and_match_gguf_quantizer():
    w = _weights(8, 256)
    data, raw = encode(w, GGUFType.Q5_0)
    ours = _gguf(data, GGUFType.Q5_0, w.shape)
    ref = _gguf(gguf.quants.quantize(w.numpy(), T.Q5_0), GGUFType.Q5_0, w.shape)
    assert raw == "Q5_0"
    assert ((ours - w) ** 2).sum() <= ((ref - w) ** 2).sum()  # searched scales: never worse than llama.cpp's own


@pytest.mark.parametrize("qtype", [GGUFType.Q4_1, GGUFType.Q5_1])
def test_q4_1_q5_1_search_is_no_worse_than_gguf_quantizer(qtype):
    w = _weights(16, 256, seed=4)
    ours = _gguf(encode(w, qtype)[0], qtype, w.shape)
    ref = _gguf(gguf.quants.quantize(w.numpy(), T[qtype.value]), qtype, w.shape)
    assert ((ours - w) ** 2).sum() <= ((ref - w) ** 2).sum()
    grid = asymmetric_grid(GRIDS[qtype].bits, 32)
    assert grid == GRIDS[qtype] and asymmetric_grid(4, 128).gguf_type is None


def test_iq4_nl_search_beats_plain_codebook_rounding():
    grid, w = GRIDS[GGUFType.IQ4_NL], _weights(8, 256, seed=5)
    scale, _ = choose(grid, w)
    ours = values(grid, round_codes(grid, w, scale, None), scale, None)
    levels = torch.tensor(grid.table, dtype=torch.float32)
    plain = torch.empty_like(w)  # llama.cpp's first guess: the largest magnitude on the level 127, nearest levels
    for r in range(w.shape[0]):
        for b in range(0, 256, 32):
            x = w[r, b:b + 32]
            d = float(torch.tensor(float(x.abs().max()) / 127).half())
            plain[r, b:b + 32] = d * levels[(x.unsqueeze(1) / d - levels).abs().argmin(1)]
    assert ((ours - w) ** 2).sum() < 0.9 * ((plain - w) ** 2).sum()


def _q4_k_plain(w: torch.Tensor) -> torch.Tensor:
    """Q4_K without search, by plain loops: each 32-block's scale (max - min) / 15 and min -min(min, 0),
    both rounded to 6 bits against the super-block's largest (llama.cpp's reference without the search)."""
    out = torch.empty_like(w)
    for r in range(w.shape[0]):
        for s0 in range(0, w.shape[1], 256):
            blocks = [w[r, s0 + j * 32:s0 + (j + 1) * 32] for j in range(8)]
            lows = [min(float(b.min()), 0.0) for b in blocks]
            scales = [(float(b.max()) - lo) / 15 for b, lo in zip(blocks, lows, strict=True)]
            d = float(torch.tensor(max(scales) / 63).half())
            dmin = float(torch.tensor(max(-lo for lo in lows) / 63).half())
            for j, b in enumerate(blocks):
                s = d * min(63, round(scales[j] / d)) if d else 0.0
                m = dmin * min(63, round(-lows[j] / dmin)) if dmin else 0.0
                q = torch.clamp(torch.round((b + m) / s), 0, 15) if s else torch.zeros_like(b)
                out[r, s0 + j * 32:s0 + (j + 1) * 32] = s * q - m
    return out


def test_q4_k_search_beats_plain_rounding_and_follows_importance():
    grid, w = K_GRIDS[GGUFType.Q4_K], _weights(8, 512, seed=1)
    scale, mins = choose(grid, w)
    ours = values(grid, round_codes(grid, w, scale, mins), scale, mins)
    plain = _q4_k_plain(w)
    assert ((ours - w) ** 2).sum() < 0.9 * ((plain - w) ** 2).sum()
    imp = torch.ones(512)
    imp[::4] = 100.0  # every fourth column matters most (inside every block)
    scale, mins = choose(grid, w, imp)
    weighted = values(grid, round_codes(grid, w, scale, mins), scale, mins)
    assert ((weighted - w)[:, ::4] ** 2).sum() < 0.9 * ((ours - w)[:, ::4] ** 2).sum()


def test_two_level_recovers_the_levels_or_refuses():
    grid, w = K_GRIDS[GGUFType.Q4_K], _weights(4, 512)
    scale, _ = choose(grid, w)
    d, levels = two_level(scale, grid.levels, 8)
    assert torch.equal(d.float().repeat_interleave(8, 1) * levels.float(), scale)
    assert int(levels.min()) >= 0 and int(levels.max()) <= 63
    with pytest.raises(ValueError, match="not calibrated for this K-quant type"):
        two_level(scale * 1.001, grid.levels, 8)


def test_gptq_in_the_k_grid():
    grid, w = K_GRIDS[GGUFType.Q4_K], _weights(8, 256, seed=2)
    codes, scale, mins = gptq_quantize_k(w, torch.eye(256), grid, damp=0.0)
    s, m = choose(grid, w, torch.ones(256))
    assert torch.equal(codes, round_codes(grid, w, s, m))  # H = I: no error feedback, plain rounding
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1024, 256, generator=g) @ torch.randn(256, 256, generator=g) * 0.2  # correlated inputs
    H = x.t() @ x / x.shape[0]
    codes, scale, mins = gptq_quantize_k(w, H, grid)
    gptq = values(grid, codes, scale, mins)
    s, m = choose(grid, w, torch.diag(H))
    rtn = values(grid, round_codes(grid, w, s, m), s, m)

    def loss(q):
        e = q - w
        return float(torch.einsum("oi,ij,oj->", e, H, e))

    assert loss(gptq) < 0.8 * loss(rtn)


def test_asymmetric_fair_linear_reference_and_state_dict():
    grid, w = K_GRIDS[GGUFType.Q4_K], _weights(8, 256)
    scale, mins = choose(grid, w)
    codes = round_codes(grid, w, scale, mins)
    layer = FairLinear.from_codes(codes, scale, None, 4, 16, 32, dtype=torch.float16, mins=mins,
                                  scale_dtype=torch.float32, grid=grid)
    assert torch.equal(layer.dequantized_weight(), values(grid, codes, scale, mins))
    assert layer.set_kernel("auto") is not None and layer.kernel == "reference"  # said why, not silently
    x = torch.randn(3, 256)
    assert torch.allclose(layer(x), x @ values(grid, codes, scale, mins).t(), atol=1e-5)
    again = FairLinear(256, 8, False, 4, 16, 32, dtype=torch.float16, grid=grid, scale_dtype=torch.float32)
    again.load_state_dict(layer.state_dict())
    assert torch.equal(again.dequantized_weight(), layer.dequantized_weight())
    assert layer_type(4, grid) is GGUFType.Q4_K and layer_type(4, None) is GGUFType.Q4_0


def test_q4_k_m_rules_match_llama_quantize():
    # the layout llama-quantize 0.3.36 wrote for the shipped 4-layer model (d_model 256, MLP 704)
    seen = {(role, i, n_in): linear_type(GGUFType.Q4_K_M, role, i, 4, n_in)
            for role in (None, "attn_v", "ffn_down") for i in range(4) for n_in in (256, 704)}
    assert [seen[("attn_v", i, 256)] for i in range(4)] == [GGUFType.Q4_K] * 2 + [GGUFType.Q6_K] * 2
    assert [seen[("ffn_down", i, 704)] for i in range(4)] == [GGUFType.Q5_0] * 2 + [GGUFType.Q8_0] * 2
    assert {seen[(None, i, 256)] for i in range(4)} == {GGUFType.Q4_K}
    # use_more_bits for 32 layers, written out from llama.cpp's rule: first and last 4, then every third
    more = [i for i in range(32) if use_more_bits(i, 32)]
    assert more == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]


def test_embedding_of_a_narrow_model_falls_back_as_llama_cpp_does():
    from optimum_fair.export.gguf_types import mix_for, rounded

    mix = mix_for("Q4_K_M")
    assert (mix.embedding_type(256), mix.embedding_type(96)) == (GGUFType.Q4_K, GGUFType.Q5_0)
    w = _weights(8, 96)
    assert torch.equal(rounded(w, GGUFType.Q4_K_M), rounded(w, GGUFType.Q5_0))  # no error on 96-wide rows


def test_int4_kernel_takes_mins_and_leaves_codebooks_to_the_reference():
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(6))
    cases = ((GGUFType.Q4_K, "int4_weight"), (GGUFType.Q4_1, "int4_weight"), (GGUFType.IQ4_XS, "reference"))
    for qtype, kernel in cases:
        grid, w = GRIDS[qtype], _weights(32, 256, seed=7)
        scale, mins = choose(grid, w)
        codes = round_codes(grid, w, scale, mins)
        layer = FairLinear.from_codes(codes, scale, None, 4, 16, 32, dtype=torch.bfloat16, mins=mins,
                                      scale_dtype=torch.float32, grid=grid)
        want = x @ values(grid, codes, scale, mins).t()
        reason = layer.set_kernel("int4_weight")
        assert layer.kernel == kernel, (qtype, reason)
        assert (reason is None) == (kernel == "int4_weight")
        got = layer(x.bfloat16()).float()
        assert (got - want).abs().max() < 0.02 * want.abs().max(), qtype  # bfloat16 activations and scales
