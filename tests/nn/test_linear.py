import torch
import torch.nn.functional as F

from optimum_fair.nn import FairLinear, kron_apply
from optimum_fair.ops import dequantize_weight, fake_quant_act, quantize_weight, weight_scale


def _reference(linear, x, w_bits, a_bits, group_size):
    scale = weight_scale(linear.weight, w_bits, group_size).to(linear.weight.dtype)
    w = dequantize_weight(quantize_weight(linear.weight, scale, w_bits, group_size), scale, group_size)
    return F.linear(fake_quant_act(x, a_bits), w.to(x.dtype), linear.bias)


def test_forward_equals_reference():
    for w_bits, a_bits, g in [(4, 4, -1), (4, 8, 16), (8, 8, -1), (4, 16, 32), (8, 16, 16)]:
        lin = torch.nn.Linear(64, 24)
        fair = FairLinear.from_linear(lin, w_bits, a_bits, g)
        x = torch.randn(2, 5, 64)
        assert torch.equal(fair(x), _reference(lin, x, w_bits, a_bits, g)), (w_bits, a_bits, g)


def test_odd_input_size_and_no_bias():
    lin = torch.nn.Linear(33, 7, bias=False)
    fair = FairLinear.from_linear(lin, 4, 16)
    x = torch.randn(4, 33)
    assert torch.equal(fair(x), _reference(lin, x, 4, 16, -1))


def test_state_dict_round_trip_bit_exact():
    lin = torch.nn.Linear(48, 16).half()
    fair = FairLinear.from_linear(lin, 4, 4, 16)
    sd = fair.state_dict()
    assert set(sd) == {"weight", "weight_scale", "bias"}
    assert sd["weight"].dtype == torch.uint8 and sd["weight"].shape == (16 * 24,)
    fresh = FairLinear(48, 16, True, 4, 4, 16, dtype=torch.float16)
    fresh.load_state_dict(sd)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, sd[k]) and v.dtype == sd[k].dtype
    x = torch.randn(3, 48).half()
    assert torch.equal(fresh(x), fair(x))


def test_packed_size_on_llada_8b_shape():
    # LLaDA-8B ff_proj: 4096 -> 12288; W4 packed + fp16 scales vs fp16 weights
    lin = torch.nn.Linear(4096, 12288, bias=False, dtype=torch.float16)
    fair = FairLinear.from_linear(lin, 4, 4)
    saved = sum(t.numel() * t.element_size() for t in fair.state_dict().values())
    fp16 = lin.weight.numel() * 2
    assert saved / fp16 <= 0.3
    assert abs(saved / fp16 - 0.25) < 0.01


def test_kron_apply_matches_kronecker_product():
    a, b = torch.randn(3, 3), torch.randn(4, 4)
    x = torch.randn(5, 12)
    torch.testing.assert_close(kron_apply(x, a, b), x @ torch.kron(a, b))


def test_transform_cancels_in_float():
    # W_tilde = W diag(s) (A kron B)^-T ; 16-bit codes keep rounding negligible
    lin = torch.nn.Linear(12, 6)
    a, b = torch.linalg.qr(torch.randn(3, 3))[0], torch.linalg.qr(torch.randn(4, 4))[0]
    s = torch.rand(12) + 0.5
    w_t = lin.weight.detach() * s @ torch.linalg.inv(torch.kron(a, b)).T
    scale = weight_scale(w_t, 8)
    fair = FairLinear.from_codes(quantize_weight(w_t, scale, 8), scale, lin.bias.detach(), 8, 16,
                                 transform_a=a, transform_b=b, input_scale=s, dtype=torch.float32)
    x = torch.randn(7, 12)
    err = (fair(x) - lin(x)).abs().max()
    assert err < 0.05


def test_kept_float_weights_give_the_same_outputs_dequantized_once(monkeypatch):
    from optimum_fair.nn.linear import float_weights_kept

    torch.manual_seed(0)
    block = torch.nn.Sequential(FairLinear.from_linear(torch.nn.Linear(32, 16), 4, 16),
                                FairLinear.from_linear(torch.nn.Linear(16, 8), 4, 4, 8))
    x = torch.randn(3, 32)
    expected = block(x)
    calls = []
    original = FairLinear.dequantized_weight
    monkeypatch.setattr(FairLinear, "dequantized_weight", lambda self: calls.append(self) or original(self))
    with float_weights_kept(block):
        outs = [block(x) for _ in range(3)]
    assert all(torch.equal(o, expected) for o in outs)
    assert len(calls) == 2  # once per layer, not once per call
    assert all(m.float_weight is None for m in block) and "float_weight" not in str(block.state_dict().keys())
    block(x)
    assert len(calls) == 4  # outside, every call dequantizes again
