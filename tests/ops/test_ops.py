import itertools

import pytest
import torch

from optimum_fair.ops import (
    dequantize_weight,
    fake_quant_act,
    fake_quant_weight,
    grid_top,
    pack_int4,
    qmax,
    quantize_weight,
    unpack_int4,
    weight_scale,
)


def test_pack_unpack_all_codes():
    codes = torch.arange(-8, 8, dtype=torch.int8)
    # every ordered pair of codes in one byte
    pairs = torch.tensor(list(itertools.product(range(-8, 8), repeat=2)), dtype=torch.int8)  # (256, 2)
    assert torch.equal(unpack_int4(pack_int4(pairs), 2), pairs)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (8,)
    assert torch.equal(unpack_int4(packed, 16), codes)
    # the 256 pairs cover all 256 byte values exactly once
    assert pack_int4(pairs).unique().numel() == 256


@pytest.mark.parametrize("shape", [(1,), (3, 5), (7, 1), (2, 3, 9), (4, 16)])
def test_pack_unpack_odd_shapes(shape):
    codes = torch.randint(-8, 8, shape, dtype=torch.int8)
    packed = pack_int4(codes)
    assert packed.shape == (*shape[:-1], (shape[-1] + 1) // 2)
    assert torch.equal(unpack_int4(packed, shape[-1]), codes)


def test_pack_rejects_out_of_range():
    with pytest.raises(ValueError):
        pack_int4(torch.tensor([8]))
    with pytest.raises(ValueError):
        unpack_int4(torch.zeros(3, dtype=torch.uint8), 8)


@pytest.mark.parametrize("grid", ["full", "symmetric"])
@pytest.mark.parametrize("bits,group_size", [(4, -1), (4, 16), (8, -1), (8, 32)])
def test_quantize_error_at_most_half_step(bits, group_size, grid):
    w = torch.randn(12, 64) * torch.logspace(-2, 1, 12).unsqueeze(1)
    scale = weight_scale(w, bits, group_size, grid=grid)
    codes = quantize_weight(w, scale, bits, group_size)
    assert codes.min() >= -qmax(bits) - 1 and codes.max() <= qmax(bits)
    deq = dequantize_weight(codes, scale, group_size)
    step = scale.repeat_interleave(64 if group_size == -1 else group_size, dim=1)
    # at most half a step; the full grid's +max|w| sits exactly half a step above the top code, so there
    # the bound holds up to float32 rounding of |w| ~ 127.5 steps: 2 * 127.5 * 2^-24 ~ 1.5e-5 of a half step
    assert ((deq - w).abs() <= step / 2 * (1 + 1e-4)).all()
    # the largest magnitude of each group maps to grid_top: 2^(b-1) - 1/2 (full) or 2^(b-1) - 1 (symmetric)
    groups = w.reshape(12, -1, 64 if group_size == -1 else group_size)
    top = qmax(bits) + (0.5 if grid == "full" else 0.0)
    torch.testing.assert_close(scale, groups.abs().amax(-1) / top)
    # fake quant == dequant(quant)
    torch.testing.assert_close(fake_quant_weight(w, bits, group_size, grid=grid), deq, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits", [4, 8])
def test_full_grid_reaches_both_ends(bits):
    """A row holding +m and -m: the full grid codes them 2^(b-1) - 1 and -2^(b-1); the symmetric one ±qmax."""
    m = 0.37
    w = torch.tensor([[m, -m, 0.0, m / 3]])
    full = quantize_weight(w, weight_scale(w, bits, grid="full"), bits)
    sym = quantize_weight(w, weight_scale(w, bits, grid="symmetric"), bits)
    assert full[0, :2].tolist() == [qmax(bits), -qmax(bits) - 1]
    assert sym[0, :2].tolist() == [qmax(bits), -qmax(bits)]
    assert grid_top(bits) == qmax(bits) + 0.5 and grid_top(bits, "symmetric") == qmax(bits)


def test_full_grid_rounds_no_worse_on_average():
    """On Gaussian rows the full grid's finer step gives a smaller mean squared round-off than max / 7."""
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(0))
    err = {g: (dequantize_weight(quantize_weight(w, s := weight_scale(w, 4, grid=g), 4), s) - w).pow(2).mean()
           for g in ("full", "symmetric")}
    assert err["full"] < 0.9 * err["symmetric"]


def test_group_size_must_divide():
    with pytest.raises(ValueError, match="group_size"):
        weight_scale(torch.randn(4, 10), 4, 3)


def test_fake_quant_act_per_token():
    x = torch.tensor([[1.0, -0.5, 0.25, 0.0], [100.0, 3.0, -7.0, 50.0]])
    y = fake_quant_act(x, 4)
    # brute force, row by row
    for row, out in zip(x, y, strict=True):
        s = row.abs().max() / 7
        expected = torch.clamp(torch.round(row / s), -8, 7) * s
        torch.testing.assert_close(out, expected)
    assert torch.equal(fake_quant_act(x, 16), x)
    assert ((fake_quant_act(x, 8) - x).abs() <= x.abs().amax(-1, keepdim=True) / 127 / 2 + 1e-6).all()


def test_fake_quant_act_straight_through_and_clip_grad():
    x = torch.randn(3, 8, requires_grad=True)
    clip = torch.tensor(0.8, requires_grad=True)
    fake_quant_act(x, 4, clip).sum().backward()
    assert x.grad is not None and clip.grad is not None


@pytest.mark.parametrize("bits", [4, 8])
def test_fake_quant_act_inference_path_equals_training_path(bits):
    # no_grad takes an in-place path; its values must be bit-identical to the straight-through path's
    x = torch.randn(5, 33, 64) * torch.logspace(-3, 3, 64)
    clip = torch.tensor(0.9, requires_grad=True)
    train = fake_quant_act(x.clone().requires_grad_(True), bits, clip).detach()
    with torch.no_grad():
        infer = fake_quant_act(x, bits, clip)
    assert torch.equal(infer, train)
    assert not torch.equal(infer, x)  # it did quantize
    half = x.to(torch.float16)
    train_half = fake_quant_act(half.clone().requires_grad_(True), bits).detach()
    with torch.no_grad():
        assert torch.equal(fake_quant_act(half, bits), train_half)
