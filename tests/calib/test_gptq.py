"""Weighted GPTQ against RTN and a plain, unbatched reference loop."""

import logging

import pytest
import torch

from optimum_fair.calib import accumulate_hessian, gptq_quantize
from optimum_fair.calib.gptq import gptq_factor
from optimum_fair.ops import dequantize_weight, quantize_weight, weight_scale


def plain_gptq(W, H, bits, group_size=-1, damp=0.01, perm=None):
    """GPTQ as in the paper, one column at a time, float64, no lazy blocks, on the full signed grid.

    Per-channel scales from W; per-group scales from the updated W at the group's first column, or, with
    a column order `perm`, fixed up front per original group. A scale maps max|w| to 2^(b-1) - 1/2.
    """
    top = 2 ** (bits - 1) - 1
    grid_top = top + 0.5
    W, H = W.double().clone(), H.double().clone()
    n = W.shape[1]
    perm = torch.arange(n) if perm is None else perm
    g = n if group_size == -1 else group_size
    static = None
    if group_size == -1 or not torch.equal(perm, torch.arange(n)):
        static = W.reshape(W.shape[0], n // g, g).abs().amax(-1) / grid_top  # (out, n_groups)
    H = H + damp * torch.diag(H).mean() * torch.eye(n, dtype=H.dtype)
    W, H = W[:, perm], H[perm][:, perm]
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    Q = torch.zeros_like(W)
    scale = static if static is not None else torch.zeros(W.shape[0], n // g, dtype=W.dtype)
    for j in range(n):
        group = int(perm[j]) // g
        if static is None and j % g == 0:
            scale[:, group] = W[:, j : j + g].abs().amax(1) / grid_top
        s = scale[:, group]
        q = torch.clamp(torch.round(W[:, j] / s), -top - 1, top)
        Q[:, j] = q
        err = (W[:, j] - q * s) / U[j, j]
        W[:, j:] -= torch.outer(err, U[j, j:])
    out = torch.empty_like(Q)
    out[:, perm] = Q
    return out.to(torch.int8), scale.float()


def correlated_inputs(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g)
    M = torch.randn(d, d, generator=g) / d**0.5 + 0.5 * torch.eye(d)
    return z @ M  # x: (n, d), strongly correlated channels


def test_identity_hessian_is_rtn_bit_for_bit():
    W = torch.randn(24, 64, generator=torch.Generator().manual_seed(0))
    H = torch.eye(64)
    for group_size in (-1, 16):
        for act_order in (False, True):
            codes, scale = gptq_quantize(W, H, 4, group_size=group_size, act_order=act_order, block_size=24)
            rtn_scale = weight_scale(W, 4, group_size)
            assert torch.equal(codes, quantize_weight(W, rtn_scale, 4, group_size))
            assert torch.equal(scale, rtn_scale)
    clip = torch.full((24, 1), 0.8)
    codes, _ = gptq_quantize(W, H, 3, clip=clip)
    assert torch.equal(codes, quantize_weight(W, weight_scale(W, 3, -1, clip), 3))


def test_docstring_example():
    W, H = torch.tensor([[0.325, 1.4]]), torch.tensor([[4.0, 1.8], [1.8, 1.0]])
    codes, scale = gptq_quantize(W, H, 4, damp=0.0, grid="symmetric")
    assert codes.tolist() == [[2, 6]]
    assert scale.item() == pytest.approx(0.2)
    codes, scale = gptq_quantize(W, H, 4, damp=0.0)  # full grid: 1.4 / 7.5; column 1 -> 7.97 -> 7, as RTN
    assert codes.tolist() == [[2, 7]]
    assert scale.item() == pytest.approx(1.4 / 7.5)


def test_uniform_weights_reproduce_plain_gptq():
    x = correlated_inputs(256, 64, seed=1).reshape(4, 64, 64)  # (batch, seq, d)
    W = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    H, n = None, 0
    for b in range(4):  # running mean over batches
        H, n = accumulate_hessian(x[b : b + 1], torch.ones(64), H, n)
    assert n == 256
    xf = x.reshape(-1, 64).double()
    H_plain = 2 * xf.t() @ xf / xf.shape[0]  # GPTQ's own normalisation; the factor 2 cancels
    for group_size in (-1, 16):
        codes, scale = gptq_quantize(W, H, 4, group_size=group_size, block_size=40)  # groups start mid-block
        ref_codes, ref_scale = plain_gptq(W, H_plain, 4, group_size)
        assert torch.equal(codes, ref_codes)
        assert torch.allclose(scale, ref_scale, rtol=1e-5)


def test_act_order_matches_plain_gptq_in_that_order():
    x = correlated_inputs(256, 32, seed=3) * torch.linspace(0.2, 3.0, 32)  # unequal diag(H)
    W = torch.randn(16, 32, generator=torch.Generator().manual_seed(4))
    H, _ = accumulate_hessian(x, None, None, 0, dtype=torch.float64)
    perm = torch.argsort(torch.diag(H), descending=True)
    for group_size in (-1, 8):
        codes, scale = gptq_quantize(W, H, 4, group_size=group_size, act_order=True, block_size=8)
        ref_codes, ref_scale = plain_gptq(W, H, 4, group_size, perm=perm)
        assert torch.equal(codes, ref_codes)
        assert torch.allclose(scale, ref_scale, rtol=1e-5)


def test_weighted_hessian_is_brute_force_sum():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 5, 4, generator=g)  # (batch, seq, d)
    w = torch.rand(5, generator=g)
    H, n = accumulate_hessian(x[:2], w, None, 0, dtype=torch.float64)
    H, n = accumulate_hessian(x[2:], w, H, n)
    brute = torch.zeros(4, 4, dtype=torch.float64)
    for b in range(3):
        for i in range(5):
            xi = x[b, i].double()
            brute += float(w[i]) * torch.outer(xi, xi)
    assert n == 15
    assert torch.allclose(H, brute / 15, atol=1e-12)
    wb = torch.rand(3, 5, generator=g)  # per-sample weights, 2-d inputs
    H2, _ = accumulate_hessian(x.reshape(15, 4), wb.reshape(15), None, 0, dtype=torch.float64)
    brute2 = sum(float(wb.reshape(-1)[k]) * torch.outer(x.reshape(15, 4)[k], x.reshape(15, 4)[k]).double()
                 for k in range(15))
    assert torch.allclose(H2, brute2 / 15, atol=1e-12)


def test_weighted_gptq_uses_the_weighted_hessian():
    x = correlated_inputs(128, 32, seed=6).reshape(2, 64, 32)
    w = torch.linspace(0.1, 2.0, 64)
    W = torch.randn(8, 32, generator=torch.Generator().manual_seed(7))
    H, _ = accumulate_hessian(x, w, None, 0)
    xf = x.reshape(-1, 32).double()
    H_brute = (xf * w.repeat(2).double().unsqueeze(1)).t() @ xf / 128
    codes, _ = gptq_quantize(W, H, 4, block_size=8)
    assert torch.equal(codes, plain_gptq(W, H_brute, 4)[0])
    H_uniform, _ = accumulate_hessian(x, None, None, 0)
    assert not torch.equal(codes, gptq_quantize(W, H_uniform, 4)[0])  # the weights change the rounding


def test_gptq_beats_rtn_on_correlated_inputs():
    x = correlated_inputs(512, 64, seed=8)
    W = torch.randn(32, 64, generator=torch.Generator().manual_seed(9))
    H, _ = accumulate_hessian(x, None, None, 0)
    for group_size in (-1, 16):
        codes, scale = gptq_quantize(W, H, 4, group_size=group_size)
        rtn_scale = weight_scale(W, 4, group_size)
        W_rtn = dequantize_weight(quantize_weight(W, rtn_scale, 4, group_size), rtn_scale, group_size)
        W_gptq = dequantize_weight(codes, scale, group_size)
        err_rtn = torch.linalg.norm(x @ W.t() - x @ W_rtn.t())
        err_gptq = torch.linalg.norm(x @ W.t() - x @ W_gptq.t())
        assert err_gptq < 0.9 * err_rtn


def test_dead_columns_get_zero_codes(caplog):
    x = correlated_inputs(128, 16, seed=10)
    x[:, 3] = 0.0
    W = torch.randn(8, 16, generator=torch.Generator().manual_seed(11))
    H, _ = accumulate_hessian(x, None, None, 0, dtype=torch.float64)
    codes, scale = gptq_quantize(W, H, 4, group_size=8)
    assert torch.all(codes[:, 3] == 0)
    assert torch.isfinite(scale).all()
    with caplog.at_level(logging.WARNING, logger="optimum_fair.calib.gptq"):
        codes, _ = gptq_quantize(W, H, 4, damp=0.0)  # the dead input needs no damping
    assert not caplog.records
    live = [j for j in range(16) if j != 3]  # the others are quantized as if the dead input did not exist
    assert torch.equal(codes[:, live], plain_gptq(W[:, live], H[live][:, live], 4, damp=0.0)[0])
    assert torch.all(codes[:, 3] == 0)


def test_not_positive_definite_retries_then_raises(caplog):
    W = torch.tensor([[0.3, 1.0]])
    with caplog.at_level(logging.WARNING, logger="optimum_fair.calib.gptq"):
        codes, _ = gptq_quantize(W, torch.tensor([[1.0, 2.0], [2.0, 1.0]]), 4)  # eigenvalues 3, -1
    assert len([r for r in caplog.records if "not positive definite" in r.message]) >= 2
    assert codes.shape == (1, 2)
    with pytest.raises(ValueError, match="positive definite"):
        gptq_quantize(W, torch.tensor([[1.0, 50.0], [50.0, 1.0]]), 4)


def test_bad_input_raises():
    W, H = torch.randn(4, 8), torch.eye(8)
    with pytest.raises(ValueError, match="W contains"):
        gptq_quantize(torch.full((4, 8), float("nan")), H, 4)
    with pytest.raises(ValueError, match="H contains"):
        gptq_quantize(W, torch.full((8, 8), float("inf")), 4)
    with pytest.raises(ValueError, match="H must have shape"):
        gptq_quantize(W, torch.eye(4), 4)
    with pytest.raises(ValueError, match="group_size"):
        gptq_quantize(W, H, 4, group_size=3)
    with pytest.raises(ValueError, match="w must be non-negative"):
        accumulate_hessian(torch.randn(2, 3), torch.tensor([1.0, -1.0]), None, 0)
    with pytest.raises(ValueError, match="H must have shape"):
        accumulate_hessian(torch.randn(2, 3), None, torch.zeros(2, 2), 0)


def test_hessian_sums_of_batches_give_the_running_mean():
    from optimum_fair.calib import hessian_sum

    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(6, 5, 8, generator=g), torch.rand(5, generator=g)
    H, n = accumulate_hessian(x, w, None, 0, dtype=torch.float64)
    parts = [hessian_sum(x[i:i + 2], w) for i in range(0, 6, 2)]
    total = parts[0][0] + parts[1][0] + parts[2][0]
    assert sum(c for _, c in parts) == n == 30
    assert torch.allclose(total / n, H, rtol=1e-12, atol=1e-14)
    assert total.dtype == torch.float64
    with pytest.raises(ValueError, match="non-negative"):
        hessian_sum(x, -w)


@pytest.mark.parametrize("d, rows", [(7, 4), (8, 4), (9, 4), (5, 8), (300, 256)])
def test_gram_from_the_block_triangle_equals_the_full_product(d, rows):
    from optimum_fair.calib.gptq import gram

    x = torch.randn(40, d, generator=torch.Generator().manual_seed(d), dtype=torch.float64)
    brute = torch.stack([torch.outer(r, r) for r in x]).sum(0)  # Σ_i x_i x_iᵀ, token by token
    assert torch.allclose(gram(x, rows), brute, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("act_order", [False, True])
def test_shared_factor_equals_per_linear_gptq(act_order):
    """q/k/v share one gptq_factor(H): each gives the codes of its own gptq_quantize(W, H) call, and the
    in-place (overwrite=True) factorisation equals the copying one."""
    x = correlated_inputs(256, 32, seed=30)
    H, _ = accumulate_hessian(x, None, None, 0, dtype=torch.float64)
    factor = gptq_factor(H.clone(), damp=0.01, act_order=act_order, overwrite=True)
    copy = gptq_factor(H, damp=0.01, act_order=act_order)
    assert torch.equal(factor.hinv, copy.hinv) and torch.equal(factor.perm, copy.perm)
    for seed in (31, 32, 33):
        W = torch.randn(16, 32, generator=torch.Generator().manual_seed(seed))
        want = gptq_quantize(W, H, 4, group_size=8, act_order=act_order)
        got = gptq_quantize(W, None, 4, group_size=8, factor=factor)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    with pytest.raises(ValueError, match="factor is for 32"):
        gptq_quantize(torch.randn(4, 16), None, 4, factor=factor)
    with pytest.raises(ValueError, match="needs H or a factor"):
        gptq_quantize(W, None, 4)
