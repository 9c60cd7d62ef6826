"""Learned (FlatQuant-style) and fixed Hadamard transforms: exact in FP, fake quant, export to FairLinear."""

import pytest
import torch
from torch import nn

from optimum_fair.calib import (
    CalibLinear,
    TransformParams,
    accumulate_hessian,
    channel_absmax,
    hadamard_transform,
    smooth_scale,
)
from optimum_fair.nn import FairLinear


def outlier_inputs(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) @ (torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d))
    x[..., 3] *= 20.0  # an outlier channel
    return x


def make_linear(d_in, d_out, seed, bias=True):
    torch.manual_seed(seed)
    return nn.Linear(d_in, d_out, bias=bias)


def perturb_(params, seed):
    """Make A, B non-orthogonal and s non-trivial, as after some training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if params.A is not None:
            params.A.add_(0.1 * torch.randn(params.A.shape, generator=g))
            params.B.add_(0.1 * torch.randn(params.B.shape, generator=g))
        if params.s is not None:
            params.s.mul_(torch.rand(params.s.shape, generator=g) + 0.5)


def fake_quant_rows(t, bits, clip, weights=False):
    """Plain symmetric fake quantization of each row of t (2-d) with ratio `clip` (scalar or (rows, 1)):
    max|row| maps to 2^(b-1) - 1 for activations, to 2^(b-1) - 1/2 for weights (the full grid)."""
    top = 2 ** (bits - 1) - 1
    scale = (t.abs().amax(-1, keepdim=True) * clip / (top + 0.5 * weights)).clamp(min=1e-8)
    return torch.clamp(torch.round(t / scale), -top - 1, top) * scale


def test_smooth_scale_formula():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 8, generator=g)
    w1, w2 = torch.randn(4, 8, generator=g), torch.randn(6, 8, generator=g)
    act = channel_absmax(x[5:], channel_absmax(x[:5]))
    assert torch.equal(act, x.abs().amax(0))
    s = smooth_scale(act, [w1, w2], alpha=0.3)
    wmax = torch.cat([w1, w2]).abs().amax(0)
    assert torch.allclose(s, act**0.3 / wmax**0.7, rtol=1e-6)
    with pytest.raises(ValueError, match="alpha"):
        smooth_scale(act, [w1], alpha=1.5)


def test_transform_matches_explicit_kronecker():
    d = 24
    x = outlier_inputs(5, d, seed=1)
    s = smooth_scale(channel_absmax(x), [torch.randn(4, d)])
    p = TransformParams(d, kron="hadamard", smooth=s, generator=torch.Generator().manual_seed(2))
    perturb_(p, seed=3)
    P = torch.kron(p.A, p.B).detach().double()  # (d, d)
    xt = (x.double() / p.s.detach().double()) @ P
    assert torch.allclose(p(x).double(), xt, atol=1e-4)
    W = torch.randn(6, d)
    Wt = (W.double() * p.s.detach().double()) @ torch.linalg.inv(P).t()
    assert torch.allclose(p.transform_weight(W).double(), Wt, atol=1e-4)


@pytest.mark.parametrize("kron", ["hadamard", "identity", "none"])
@pytest.mark.parametrize("smooth", [True, False])
def test_unquantized_path_equals_the_linear(kron, smooth):
    d = 64
    lin = make_linear(d, 48, seed=4)
    x = outlier_inputs(16, d, seed=5).reshape(2, 8, d)  # (batch, seq, d)
    s = smooth_scale(channel_absmax(x), [lin.weight]) if smooth else None
    p = TransformParams(d, kron=kron, smooth=s, generator=torch.Generator().manual_seed(6))
    perturb_(p, seed=7)
    cl = CalibLinear(lin, p, w_bits=4, a_bits=4)
    cl.quantize = False
    with torch.no_grad():
        assert torch.allclose(cl(x), lin(x), atol=1e-5, rtol=1e-5)


def test_quantized_forward_matches_plain_fake_quant():
    d = 32
    lin = make_linear(d, 16, seed=8)
    x = outlier_inputs(12, d, seed=9)
    p = TransformParams(d, smooth=smooth_scale(channel_absmax(x), [lin.weight]),
                        generator=torch.Generator().manual_seed(10))
    perturb_(p, seed=11)
    cl = CalibLinear(lin, p, w_bits=4, a_bits=4)
    with torch.no_grad():
        cl.weight_clip_logit.copy_(torch.linspace(1.0, 3.0, 16).unsqueeze(1))
        P = torch.kron(p.A, p.B)
        xq = fake_quant_rows((x / p.s) @ P, 4, torch.sigmoid(p.act_clip_logit))
        Wt = (lin.weight * p.s) @ torch.linalg.inv(P).t()
        Wq = fake_quant_rows(Wt, 4, torch.sigmoid(cl.weight_clip_logit), weights=True)
        assert torch.allclose(cl(x), xq @ Wq.t() + lin.bias, atol=1e-4)


def test_gradients_reach_transforms_and_clips():
    d = 16
    lin = make_linear(d, 8, seed=12)
    x = outlier_inputs(8, d, seed=13)
    p = TransformParams(d, smooth=smooth_scale(channel_absmax(x), [lin.weight]),
                        generator=torch.Generator().manual_seed(14))
    cl = CalibLinear(lin, p, w_bits=4, a_bits=4)
    (cl(x) - lin(x).detach()).pow(2).mean().backward()
    for name in ("A", "B", "s", "act_clip_logit"):
        grad = getattr(p, name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert cl.weight_clip_logit.grad is not None and cl.weight_clip_logit.grad.abs().sum() > 0
    assert lin.weight.grad is None  # the FP weight stays frozen


@pytest.mark.parametrize("group_size", [-1, 16])
def test_rtn_export_reproduces_calib_linear(group_size):
    d = 64
    lin = make_linear(d, 24, seed=15)
    x = outlier_inputs(20, d, seed=16).reshape(4, 5, d)
    p = TransformParams(d, smooth=smooth_scale(channel_absmax(x), [lin.weight]),
                        generator=torch.Generator().manual_seed(17))
    perturb_(p, seed=18)
    cl = CalibLinear(lin, p, w_bits=4, a_bits=4, group_size=group_size)
    with torch.no_grad():
        cl.weight_clip_logit.copy_(torch.linspace(0.5, 4.0, 24).unsqueeze(1))
        p.act_clip_logit.fill_(1.5)
        fair = FairLinear.from_codes(**cl.export("rtn"), dtype=torch.float32)
        assert torch.allclose(fair(x), cl(x), atol=1e-5)
    kw = cl.export("rtn")
    assert kw["act_clip"] == pytest.approx(float(torch.sigmoid(torch.tensor(1.5))))
    assert kw["codes"].dtype == torch.int8 and kw["codes"].abs().max() <= 8


def test_folded_transforms_keep_the_fp_output():
    d = 64
    lin = make_linear(d, 32, seed=19)
    x = outlier_inputs(32, d, seed=20)
    p = TransformParams(d, smooth=smooth_scale(channel_absmax(x), [lin.weight]),
                        generator=torch.Generator().manual_seed(21))
    perturb_(p, seed=22)
    cl = CalibLinear(lin, p, w_bits=8, a_bits=16, weight_clip=False)
    fair = FairLinear.from_codes(**cl.export("rtn"), dtype=torch.float32)
    with torch.no_grad():
        rel = (fair(x) - lin(x)).norm() / lin(x).norm()
    assert rel < 5e-3  # only the 8-bit weight rounding is left


def test_gptq_export_uses_the_transformed_hessian():
    d = 64
    lin = make_linear(d, 32, seed=23)
    x = outlier_inputs(256, d, seed=24)
    p = TransformParams(d, generator=torch.Generator().manual_seed(25), act_clip=False)
    cl = CalibLinear(lin, p, w_bits=4, a_bits=16, weight_clip=False)
    with torch.no_grad():
        H, _ = accumulate_hessian(cl.transformed_input(x), None, None, 0)
        errs = {}
        for rounding in ("rtn", "gptq"):
            fair = FairLinear.from_codes(**cl.export(rounding, H=H), dtype=torch.float32)
            errs[rounding] = (fair(x) - lin(x)).norm()
    assert errs["gptq"] < 0.9 * errs["rtn"]
    with pytest.raises(ValueError, match="H is required"):
        cl.export("gptq")
    with pytest.raises(ValueError, match="rounding"):
        cl.export("nearest")


def test_hadamard_only_path():
    d = 64
    lin = make_linear(d, 16, seed=26)
    x = outlier_inputs(32, d, seed=27)
    p = hadamard_transform(d, torch.Generator().manual_seed(28))
    cl = CalibLinear(lin, p, w_bits=4, a_bits=4, weight_clip=False)
    assert not [q for q in cl.parameters() if q.requires_grad]  # nothing to learn
    kw = cl.export("rtn")
    assert kw["input_scale"] is None and kw["act_clip"] is None and kw["transform_a"] is not None
    fair = FairLinear.from_codes(**kw, dtype=torch.float32)
    plain = FairLinear.from_codes(**CalibLinear(lin, TransformParams(d, kron="none", act_clip=False), 4, 4,
                                                weight_clip=False).export("rtn"), dtype=torch.float32)
    with torch.no_grad():
        assert torch.allclose(fair(x), cl(x), atol=1e-5)
        err_rot = (fair(x) - lin(x)).norm()
        err_plain = (plain(x) - lin(x)).norm()
    assert err_rot < err_plain  # the rotation tames the outlier channel at W4A4


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="kron"):
        TransformParams(8, kron="random")
    with pytest.raises(ValueError, match="smooth"):
        TransformParams(8, smooth=torch.ones(4))
    with pytest.raises(ValueError, match="params is for d=8"):
        CalibLinear(nn.Linear(16, 4), TransformParams(8), 4, 4)
    with pytest.raises(ValueError, match="group_size"):
        CalibLinear(nn.Linear(8, 4), TransformParams(8), 4, 4, group_size=3)
