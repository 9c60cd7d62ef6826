"""weighted_mse: the only calibration loss."""

import pytest
import torch
import torch.nn.functional as F

from optimum_fair.calib import weighted_mse


def test_uniform_weights_equal_mse_loss():
    g = torch.Generator().manual_seed(0)
    ref, out = torch.randn(3, 5, 7, generator=g), torch.randn(3, 5, 7, generator=g)
    expected = F.mse_loss(out, ref)
    assert torch.allclose(weighted_mse(ref, out, torch.ones(5)), expected, rtol=1e-6)
    assert torch.allclose(weighted_mse(ref, out, torch.full((3, 5), 2.5)), expected, rtol=1e-6)
    assert torch.allclose(weighted_mse(ref, out, None), expected, rtol=1e-6)


def test_weights_match_plain_sum():
    g = torch.Generator().manual_seed(1)
    ref, out = torch.randn(2, 4, 3, generator=g), torch.randn(2, 4, 3, generator=g)
    w = torch.rand(2, 4, generator=g)
    num = den = 0.0
    for b in range(2):
        for i in range(4):
            num += float(w[b, i]) * float(((out[b, i] - ref[b, i]) ** 2).sum())
            den += float(w[b, i]) * 3
    assert weighted_mse(ref, out, w).item() == pytest.approx(num / den, rel=1e-5)


def test_docstring_example_and_per_position_weights():
    ref = torch.zeros(1, 2, 2)
    out = torch.tensor([[[1.0, 1.0], [2.0, 2.0]]])
    assert weighted_mse(ref, out, torch.tensor([3.0, 1.0])).item() == pytest.approx(1.75)
    # a (seq,) weight is shared by every sample of the batch
    ref2, out2 = ref.expand(3, 2, 2), out.expand(3, 2, 2)
    assert weighted_mse(ref2, out2, torch.tensor([3.0, 1.0])).item() == pytest.approx(1.75)


def test_gradient_flows_to_out_only_through_weighted_positions():
    ref = torch.zeros(1, 3, 2)
    out = torch.ones(1, 3, 2, requires_grad=True)
    weighted_mse(ref, out, torch.tensor([1.0, 0.0, 1.0])).backward()
    assert torch.all(out.grad[0, 1] == 0) and torch.all(out.grad[0, 0] > 0)


def test_bad_input_raises():
    x = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match="out shape"):
        weighted_mse(x, torch.zeros(2, 3, 5))
    with pytest.raises(ValueError, match="ref must be"):
        weighted_mse(torch.zeros(3, 4), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="w must have shape"):
        weighted_mse(x, x, torch.ones(4))
    with pytest.raises(ValueError, match="non-negative"):
        weighted_mse(x, x, torch.tensor([1.0, -1.0, 1.0]))


def test_per_sample_terms_add_up_to_the_weighted_mse():
    from optimum_fair.calib import weighted_sq_error

    g = torch.Generator().manual_seed(2)
    ref, out = torch.randn(3, 5, 4, generator=g), torch.randn(3, 5, 4, generator=g)
    w = torch.rand(3, 5, generator=g)
    num, den = weighted_sq_error(ref, out, w, dtype=torch.float64)
    assert num.shape == den.shape == (3,)
    assert float(num.sum() / den.sum()) == pytest.approx(float(weighted_mse(ref, out, w)), rel=1e-6)
    assert float(num[1] / den[1]) == pytest.approx(float(weighted_mse(ref[1:2], out[1:2], w[1:2])), rel=1e-6)
