"""Integer kernels against the fake-quant reference path and exact (int64 / float64) arithmetic.

Bounds used below, with u(dtype) the unit round-off (2^-24 fp32, 2^-8 bf16, 2^-11 fp16) and
S = |x_hat| @ |w_hat|^T the sum of absolute products per output:
* the integer accumulator is exact: torch._int_mm == int64 matmul of the same codes;
* the int8_mm output differs from the exact product of the codes only by the int32 -> fp32 conversion,
  two scale multiplies, the cast and the bias add: |y_int - y_exact| <= 4 u(fp32) S + u(x) (2 |y| + |b|);
* the reference rounds the dequantized weight to its storage dtype, the activations to x's dtype, and
  accumulates K products: |y_ref - y_exact| <= (u(store) + u(x) + K u(fp32)) S + u(x) (2 |y| + |b|).
"""

from __future__ import annotations

import logging

import pytest
import torch

from optimum_fair import use_kernels
from optimum_fair.nn import FairLinear, reference_kernels
from optimum_fair.nn.kernels import int4_pack, int4_unpack, int_mm
from optimum_fair.ops import fake_quant_act, quantize_act, quantize_weight, weight_scale

U = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def _hadamard(n: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n**0.5


def _layer(in_f, out_f, w_bits, a_bits, dtype=torch.float32, transforms=False, group_size=-1, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * (1 + torch.rand(out_f, 1, generator=g))
    scale = weight_scale(w, w_bits, group_size).to(dtype)
    codes = quantize_weight(w, scale, w_bits, group_size)
    extra = {}
    if transforms:  # smoothing, a Kronecker Hadamard and a learned clip, as FlatQuant / Hadamard write them
        n1 = 2 ** ((in_f.bit_length() - 1) // 2)
        extra = dict(transform_a=_hadamard(n1), transform_b=_hadamard(in_f // n1),
                     input_scale=0.5 + torch.rand(in_f, generator=g), act_clip=0.9)
    bias = torch.randn(out_f, generator=g).to(dtype)
    return FairLinear.from_codes(codes, scale, bias, w_bits, a_bits, group_size, dtype=dtype, **extra)


def _exact(layer: FairLinear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, S) in float64 from the layer's codes: the value both paths approximate, and its scale."""
    if layer.a_bits <= 8:  # the activation codes both paths compute, times their fp32 scale
        codes, scale = quantize_act(layer.transformed_input(x), layer.a_bits, layer._clip())
    x_hat = codes.double() * scale.double() if layer.a_bits <= 8 else layer.transformed_input(x).double()
    w_hat = layer.codes().double() * layer.weight_scale.double().repeat_interleave(
        layer.in_features // layer.weight_scale.shape[1], dim=1)
    return x_hat @ w_hat.t() + layer.bias.double(), x_hat.abs() @ w_hat.abs().t()


FORMATS = [(8, 8), (4, 8), (4, 4)]


@pytest.mark.parametrize("w_bits,a_bits", FORMATS)
@pytest.mark.parametrize("transforms", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_mm_equals_the_reference_within_float_rounding(w_bits, a_bits, transforms, dtype):
    layer = _layer(256, 48, w_bits, a_bits, dtype, transforms)
    x = torch.randn(3, 7, 256, generator=torch.Generator().manual_seed(1)).to(dtype)
    with torch.no_grad():
        ref = layer(x)
        assert layer.set_kernel() is None and layer.kernel == "int8_mm"
        out = layer(x)
    y, s = _exact(layer, x)
    u_x = U[dtype]
    assert out.dtype == ref.dtype == dtype and out.shape == (3, 7, 48)
    rounding = u_x * (2 * y.abs() + layer.bias.double().abs()) + 1e-6  # output cast and bias add in x's dtype
    assert ((out.double() - y).abs() <= 4 * U[torch.float32] * s + rounding).all()
    bound = (U[dtype] + u_x + 260 * U[torch.float32]) * s + rounding
    assert ((out.double() - ref.double()).abs() <= 2 * bound).all()
    assert not torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("a_bits", [4, 8])
def test_activation_codes_and_int32_accumulator_are_exact(a_bits):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(33, 200, generator=g) * torch.rand(33, 1, generator=g) * 10
    codes, scale = quantize_act(x, a_bits, 0.8)
    top = 2 ** (a_bits - 1)
    assert codes.dtype == torch.int8 and -top <= codes.long().min() < codes.long().max() < top
    assert torch.equal((codes.float() * scale), fake_quant_act(x, a_bits, 0.8))  # the reference's values
    w = torch.randint(-128, 128, (200, 24), generator=g, dtype=torch.int8)
    assert torch.equal(int_mm(codes, w).long(), codes.long() @ w.long())  # exact, brute-force int64
    assert torch.equal(int_mm(codes, w.t().contiguous().t()).long(), codes.long() @ w.long())  # strided operand


@pytest.mark.parametrize("w_bits,a_bits", FORMATS + [(4, 16)])
@pytest.mark.parametrize("packed", [False, True])
def test_state_dict_is_the_checkpoint_format_on_every_kernel(w_bits, a_bits, packed):
    dtype = torch.bfloat16 if a_bits == 16 else torch.float32
    layer = _layer(128, 32, w_bits, a_bits, dtype, transforms=True)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    assert layer.set_kernel("auto", packed=packed) is None
    after = layer.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    fresh = FairLinear(128, 32, True, w_bits, a_bits, kron_dims=(8, 16), smooth=True, act_clip=True, dtype=dtype)
    fresh.set_kernel()
    fresh.load_state_dict(after)  # loading into a layer on a kernel puts it back on the checkpoint format
    assert fresh.kernel == "reference" and torch.equal(fresh.codes(), layer.codes())


def test_resident_weight_bytes_per_kernel():
    n, k = 64, 256
    sizes = {}
    for a_bits, packed, dtype in [(4, False, torch.float32), (4, True, torch.float32), (16, False, torch.bfloat16)]:
        layer = _layer(k, n, 4, a_bits, dtype)
        layer.set_kernel(packed=packed)
        sizes[(layer.kernel, packed)] = sum(b.numel() * b.element_size() for name, b in layer.named_buffers()
                                            if name != "bias" and name != "weight_scale")
    assert sizes[("int8_mm", False)] == n * k  # int8 codes, no int4 copy beside them
    assert sizes[("int8_mm", True)] == n * k // 2  # the checkpoint's int4 bytes only
    assert n * k // 2 < sizes[("int4_weight", False)] <= n * k // 2 + 4 * n * k // 256  # + bf16 scale / zero


@pytest.mark.parametrize("group_size", [-1, 32, 128, 512])
def test_int4_weight_equals_the_exact_product_within_bfloat16_rounding(group_size):
    k = 1024
    layer = _layer(k, 48, 4, 16, torch.bfloat16, group_size=group_size)
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(3)).bfloat16()
    with torch.no_grad():
        ref = layer(x)
        assert layer.set_kernel() is None and layer.kernel == "int4_weight"
        out = layer(x)
    y, s = _exact(layer, x)
    u = U[torch.bfloat16]
    assert ((out.double() - y).abs() <= (u + k * U[torch.float32]) * s + 2 * u * y.abs() + 1e-3).all()
    assert ((out.double() - ref.double()).abs() <= 2 * (2 * u + k * U[torch.float32]) * s + 4 * u * y.abs()).all()


def test_int4_layout_round_trip_is_exact():
    g = torch.Generator().manual_seed(4)
    codes = torch.randint(-8, 8, (48, 320), generator=g, dtype=torch.int8)
    packed, sz, group = int4_pack(codes, torch.rand(48, 1, generator=g), -1)
    assert group == 64 and sz.shape == (5, 48, 2)
    assert torch.equal(int4_unpack(packed, 48, 320), codes)


def test_layers_no_kernel_takes_stay_on_the_reference_path_with_a_reason():
    grouped = _layer(256, 32, 4, 4, group_size=64)
    assert "group_size=64" in grouped.set_kernel() and grouped.kernel == "reference"
    narrow = _layer(256, 40, 4, 16, torch.bfloat16)
    assert "divisible by 16" in narrow.set_kernel() and narrow.kernel == "reference"
    fp32_w4a16 = _layer(256, 32, 4, 16, torch.float32)
    assert "bfloat16" in fp32_w4a16.set_kernel() and fp32_w4a16.kernel == "reference"
    assert fp32_w4a16.set_kernel("int4_weight") is None and fp32_w4a16.kernel == "int4_weight"  # asked by name
    assert "W8A8" in _layer(256, 32, 8, 8).set_kernel("int4_weight")
    with pytest.raises(ValueError, match="kernel must be one of"):
        grouped.set_kernel("fast")


def test_use_kernels_logs_the_fallbacks_once_and_reference_kernels_restores(caplog):
    model = torch.nn.Sequential(_layer(256, 256, 4, 4), _layer(256, 256, 4, 4, group_size=64), _layer(256, 32, 8, 8))
    with caplog.at_level(logging.WARNING, logger="optimum_fair"):
        assert use_kernels(model) == {"int8_mm": 2, "reference": 1}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "1 layer(s)" in warnings[0] and "group_size=64" in warnings[0]
    x = torch.randn(4, 256)
    with torch.no_grad():
        fast = model(x)
        with reference_kernels(model):
            assert [m.kernel for m in model] == ["reference"] * 3
            slow = model(x)
        assert [m.kernel for m in model] == ["int8_mm", "reference", "int8_mm"]
        assert torch.allclose(fast, slow, rtol=1e-4, atol=1e-4 * slow.abs().max().item())
        assert torch.equal(model(x), fast)


def test_empty_and_single_token_inputs():
    layer = _layer(64, 16, 4, 4)
    layer.set_kernel()
    assert layer(torch.randn(0, 5, 64)).shape == (0, 5, 16)
    one = torch.randn(1, 64)
    with torch.no_grad():
        y = layer(one)
        with reference_kernels(layer):
            assert torch.allclose(y, layer(one), atol=1e-5)


def test_siblings_with_one_input_transform_share_its_quantization_and_stay_exact():
    from optimum_fair.nn.dispatch import share_inputs

    class Block(torch.nn.Module):  # q / k / v read one input; o reads another
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = (_layer(256, 64, 4, 4, transforms=True, seed=s) for s in (1, 2, 3))
            for m in (self.k, self.v):  # the same transform as q (as Hadamard / a shared FlatQuant one is)
                for name in ("transform_a", "transform_b", "input_scale", "act_clip"):
                    getattr(m, name).copy_(getattr(self.q, name))
            self.o = _layer(256, 64, 4, 4, transforms=True, seed=4)

        def forward(self, x):
            return self.q(x) + self.k(x) + self.v(x), self.o(x + 1)

    block = Block()
    x = torch.randn(2, 9, 256)
    with torch.no_grad():
        use_kernels(block)
        assert block.q.shared_input is block.k.shared_input is block.v.shared_input is not None
        assert block.o.shared_input is None  # another transform: nothing to share
        shared = block(x)
        for m in (block.q, block.k, block.v):
            m.shared_input = None
        unshared = block(x)
        assert share_inputs(block) == 1
        assert torch.equal(shared[0], unshared[0]) and torch.equal(shared[1], unshared[1])
        first = block.q(x)
        x.mul_(2)  # changed in place: the next sibling must not reuse the stale codes
        block.q.shared_input = None
        assert torch.equal(block.k(x), _unshared(block.k, x)) and not torch.equal(first, block.q(x))
        with torch.inference_mode():  # no version counter there: computed each time, still exact
            y = torch.randn(2, 9, 256)
            assert torch.equal(block.k(y), _unshared(block.k, y))


def _unshared(layer, x):
    shared, layer.shared_input = layer.shared_input, None
    try:
        return layer(x)
    finally:
        layer.shared_input = shared
