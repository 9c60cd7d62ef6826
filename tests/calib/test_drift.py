"""GPTQ against the FP prefix's outputs (input_mode="corrected"): the drift statistics and the target weight
against brute-force sums and least squares."""

import pytest
import torch

from optimum_fair.calib.gptq import drift_sum, drift_target, gptq_quantize, hessian_sum
from optimum_fair.ops import dequantize_weight


def _data(n=400, d=8, out=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_fp = torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64)
    distortion = torch.eye(d, dtype=torch.float64) + 0.2 * torch.randn(d, d, generator=g, dtype=torch.float64)
    x = x_fp @ distortion + 0.05 * torch.randn(n, d, generator=g, dtype=torch.float64)  # the quantized prefix's
    w = torch.rand(n, generator=g, dtype=torch.float64)  # token weights
    W = torch.randn(out, d, generator=g, dtype=torch.float64)
    return x_fp, x, w, W


def test_drift_sum_is_the_brute_force_sum():
    x_fp, x, w, _ = _data(n=50)
    want = sum(w[i] * torch.outer(x_fp[i] - x[i], x[i]) for i in range(50))
    assert torch.allclose(drift_sum(x_fp, x, w), want, atol=1e-10)
    batched = drift_sum(x_fp.reshape(5, 10, -1), x.reshape(5, 10, -1), w.reshape(5, 10))  # (batch, seq, d)
    assert torch.allclose(batched, want, atol=1e-10)


def test_target_is_the_weighted_least_squares_fit_of_the_fp_outputs():
    """damp 0: W' = argmin Σ w_i |W x_fp,i - W' x_i|², what numpy-style least squares gives."""
    x_fp, x, w, W = _data()
    n = x.shape[0]
    H, D = hessian_sum(x, w)[0] / n, drift_sum(x_fp, x, w) / n
    got = drift_target(W, H, D, damp=0.0)
    r = w.sqrt().unsqueeze(1)
    want = torch.linalg.lstsq(r * x, r * (x_fp @ W.t())).solution.t()  # (out, d)
    assert torch.allclose(got.double(), want, atol=1e-4)
    assert not torch.allclose(got.double(), W, atol=1e-2)  # the drift moved it


def test_no_drift_leaves_the_weight_exactly():
    _, x, w, W = _data()
    H = hessian_sum(x, w)[0] / x.shape[0]
    assert torch.equal(drift_target(W.float(), H, torch.zeros_like(H), damp=0.01), W.float())


def test_rounding_the_target_tracks_the_fp_outputs_better():
    """GPTQ on W' lands closer to the FP outputs W x_fp than GPTQ on W, both rounding under H of x (the drift
    here is mostly a linear distortion of the inputs, which a weight can undo)."""
    x_fp, x, w, W = _data(out=64)
    n = x.shape[0]
    H, D = hessian_sum(x, w)[0] / n, drift_sum(x_fp, x, w) / n

    def loss(rounded):
        Q = dequantize_weight(*rounded).double()  # (out, d)
        return float((w.unsqueeze(1) * (x_fp @ W.t() - x @ Q.t()) ** 2).sum())

    plain = gptq_quantize(W.float(), H.float(), bits=4)
    corrected = gptq_quantize(drift_target(W.float(), H, D), H.float(), bits=4)
    assert loss(corrected) < 0.5 * loss(plain)


def test_shapes_must_match():
    with pytest.raises(ValueError, match="same shape"):
        drift_sum(torch.zeros(3, 4), torch.zeros(3, 5), None)
