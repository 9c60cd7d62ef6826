"""The searched GGUF grid (issue 31): per-32 scales chosen by importance-weighted round-off.

References: a brute-force loop over the candidates, the `gguf` package's own Q4_0 / Q8_0 quantizer
(llama.cpp's reference rounding), the full grid, a dense scan of scales, and plain GPTQ steps."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from optimum_fair.calib.gptq import _group_scale, gptq_factor, gptq_quantize
from optimum_fair.enums import WeightGrid
from optimum_fair.ops import qmax, quantize_weight, scale_candidates, searched_scale, weight_scale

GGML = {4: gguf.GGMLQuantizationType.Q4_0, 8: gguf.GGMLQuantizationType.Q8_0}


def _weights(out=64, n=128, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, n, generator=g) * torch.rand(out, 1, generator=g)  # rows of different ranges


def _roundoff(w, scale, bits, importance=None) -> torch.Tensor:
    """sum_j a_j (w_j - s q_j)^2 per (row, group of 32): (out, n_groups)."""
    s = scale.repeat_interleave(32, dim=1)  # (out, in)
    q = torch.round(w / s).clamp(-qmax(bits) - 1, qmax(bits))
    a = torch.ones(w.shape[1]) if importance is None else importance
    return (a * (w - q * s) ** 2).reshape(w.shape[0], -1, 32).sum(-1)


def test_searched_scale_is_the_best_candidate_by_brute_force():
    w, imp = _weights(8, 64), torch.rand(64) + 0.1
    scale = searched_scale(w, 4, 32, imp, scale_dtype=torch.float16)
    for r in range(8):
        for gi in range(2):
            cols = slice(32 * gi, 32 * gi + 32)
            cand = scale_candidates(w[r:r + 1, cols], 4, imp[cols], scale_dtype=torch.float16)[0]
            errs = []
            for s in cand.tolist():  # one plain loop per candidate
                e = 0.0
                for x, a in zip(w[r, cols].tolist(), imp[cols].tolist(), strict=True):
                    q = min(max(round(x / s), -8), 7)
                    e += a * (x - q * s) ** 2
                errs.append(e)
            best = min(errs)
            got = _roundoff(w[r:r + 1, cols], scale[r:r + 1, gi:gi + 1], 4, imp[cols]).item()
            assert got == pytest.approx(best, rel=1e-5)


@pytest.mark.parametrize("bits", [4, 8])
def test_searched_scale_beats_llama_cpp_reference_and_full_grid(bits):
    w = _weights()
    ref = gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), GGML[bits]), GGML[bits])  # (out, in)
    ref_err = ((torch.from_numpy(ref.copy()) - w) ** 2).reshape(w.shape[0], -1, 32).sum(-1)
    searched = _roundoff(w, searched_scale(w, bits, 32, scale_dtype=torch.float16), bits)
    full = _roundoff(w, weight_scale(w, bits, 32).half().float(), bits)
    assert (searched <= ref_err * (1 + 1e-5) + 1e-12).all()  # per group, never worse than llama.cpp's
    assert (searched <= full * (1 + 1e-5) + 1e-12).all()
    if bits == 4:  # and clearly better on average at 4 bits
        assert searched.sum() < 0.93 * ref_err.sum()
        assert searched.sum() < 0.8 * full.sum()


def test_searched_scale_is_near_a_dense_scan():
    w = _weights(32, 64)
    got = _roundoff(w, searched_scale(w, 4, 32), 4)  # (32, 2)
    amax = w.abs().reshape(32, 2, 32).amax(-1, keepdim=True)  # (32, 2, 1)
    dense = amax / torch.linspace(6.0, 9.0, 601)  # (32, 2, 601) positive scales
    dense = torch.cat((dense, -dense), -1)
    wg = w.reshape(32, 2, 32, 1)
    q = torch.round(wg / dense.unsqueeze(2)).clamp(-8, 7)
    best = ((wg - q * dense.unsqueeze(2)) ** 2).sum(2).amin(-1)  # (32, 2)
    assert got.sum() <= 1.02 * best.sum()


def test_importance_moves_the_error_to_unimportant_columns():
    w = _weights(256, 32)
    imp = torch.ones(32)
    imp[5] = 100.0
    err = {}
    for name, a in {"uniform": None, "weighted": imp}.items():
        s = searched_scale(w, 4, 32, a).repeat_interleave(32, dim=1)
        q = torch.round(w / s).clamp(-8, 7)
        err[name] = ((w - q * s)[:, 5] ** 2).sum()
    assert err["weighted"] < 0.7 * err["uniform"]


def test_scales_are_stored_exactly_and_signed():
    w = _weights()
    s = searched_scale(w, 4, 32, scale_dtype=torch.float16)
    assert torch.equal(s.half().float(), s)
    assert (s < 0).any() and (s > 0).any()  # the signed extreme maps to code -8
    codes = quantize_weight(w, s, 4, 32)
    assert codes.min() >= -8 and codes.max() <= 7
    assert torch.equal(weight_scale(w, 4, 32, grid=WeightGrid.SEARCH, scale_dtype=torch.float16), s)


def test_zero_group_gets_a_finite_nonzero_scale():
    w = _weights(4, 64)
    w[1, :32] = 0
    s = searched_scale(w, 4, 32, scale_dtype=torch.float16)
    assert torch.isfinite(s).all() and (s != 0).all()
    assert (quantize_weight(w, s, 4, 32)[1, :32] == 0).all()


def test_gptq_with_identity_hessian_is_rounding_on_searched_scales():
    w = _weights(16, 64)
    codes, scale = gptq_quantize(w, None, 4, 32, factor=gptq_factor(torch.eye(64)), grid=WeightGrid.SEARCH,
                                 scale_dtype=torch.float16)
    expect = searched_scale(w, 4, 32, torch.ones(64), scale_dtype=torch.float16)
    assert torch.equal(scale, expect)
    assert torch.equal(codes, quantize_weight(w, expect, 4, 32))


def _gptq_group_loss(w, hinv, s) -> torch.Tensor:
    """Plain GPTQ steps over one group with the fixed scale s (out,): sum_i ((w_i - q_i s) / Hinv_ii)^2."""
    w, loss = w.clone(), torch.zeros(w.shape[0])
    for i in range(w.shape[1]):
        err = (w[:, i] - torch.round(w[:, i] / s).clamp(-8, 7) * s) / hinv[i, i]
        loss += err**2
        w[:, i:] -= err.unsqueeze(1) * hinv[i, i:]
    return loss


def test_gptq_aware_scale_has_the_least_in_group_loss():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 32, generator=g) @ torch.randn(32, 32, generator=g)  # correlated inputs
    H = x.T @ x
    w = _weights(24, 32)
    factor = gptq_factor(H)
    hinv, diag = factor.hinv, factor.diag
    chosen = _group_scale(w, hinv, 4, 1.0, WeightGrid.SEARCH, diag, torch.float16)  # (out,)
    cand = scale_candidates(w, 4, diag, scale_dtype=torch.float16)  # (out, C)
    losses = torch.stack([_gptq_group_loss(w, hinv, cand[:, c]) for c in range(cand.shape[1])], 1)
    assert torch.allclose(_gptq_group_loss(w, hinv, chosen), losses.amin(1), rtol=1e-4)
    by_diag = searched_scale(w, 4, 32, diag, scale_dtype=torch.float16)[:, 0]  # plain rounding's choice
    assert (_gptq_group_loss(w, hinv, chosen) <= _gptq_group_loss(w, hinv, by_diag) * (1 + 1e-5)).all()


def test_searched_scale_matches_gguf_dequantizer_after_packing():
    from optimum_fair.export.gguf_types import q_blocks

    w = _weights(8, 64)
    s = searched_scale(w, 4, 32, scale_dtype=torch.float16)
    codes = quantize_weight(w, s, 4, 32)
    back = gguf.quants.dequantize(q_blocks(codes, s, 32, 4), GGML[4])  # (8, 64)
    expect = (codes.float() * s.repeat_interleave(32, dim=1)).numpy()
    np.testing.assert_array_equal(back, expect)
