"""The machine's fast dtype and `computing_in`: forwards in another dtype, weights left as they were."""

import platform

import pytest
import torch

from optimum_fair import FairCalibConfig, devices
from optimum_fair.devices import computing_in, fast_dtype, model_float_dtype, resolve_compute_dtype
from tests.conftest import tiny_llada

X = torch.randint(4, 60, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("flags,expected", [
    ({"avx2", "avx512f"}, torch.float32),
    ({"avx2", "avx512f", "avx512_bf16"}, torch.bfloat16),
    ({"avx2", "amx_bf16", "amx_int8"}, torch.bfloat16),
    (set(), torch.float32),  # no /proc/cpuinfo: the float32 fallback
])
def test_fast_dtype_follows_the_cpu_flags(monkeypatch, flags, expected):
    monkeypatch.setattr(devices, "_cpu_flags", lambda: flags)
    assert fast_dtype(torch.device("cpu")) == expected
    assert resolve_compute_dtype("auto", torch.device("cpu")) == expected
    assert resolve_compute_dtype("float32", torch.device("cpu")) == torch.float32


@pytest.mark.skipif(platform.system() != "Linux" or platform.machine() != "x86_64", reason="x86 Linux flags")
def test_cpu_flags_are_read_from_this_machine():
    assert {"fpu", "sse2"} <= devices._cpu_flags()  # every x86-64 CPU reports both


def test_bad_compute_dtype_is_refused_naming_the_field():
    with pytest.raises(ValueError, match="compute_dtype"):
        resolve_compute_dtype("fp32", torch.device("cpu"))
    with pytest.raises(ValueError, match="compute_dtype"):
        FairCalibConfig(compute_dtype="int8")


def test_half_model_computed_in_float32_equals_a_float_copy_and_keeps_its_weights():
    model = tiny_llada(64, 3).half()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reference = tiny_llada(64, 3).half().float()  # same seed: the same fp16 weights, upcast
    with torch.no_grad(), computing_in(model, torch.float32):
        assert model_float_dtype(model) == torch.float32
        got = model(X).logits
    assert torch.equal(got, reference(X).logits)
    after = model.state_dict()
    assert all(after[k].dtype == torch.float16 and torch.equal(after[k], v) for k, v in before.items())


def test_float_model_computed_in_bfloat16_is_autocast_within_its_rounding():
    model = tiny_llada(64, 3)
    with torch.no_grad():
        ref = model(X).logits
        with computing_in(model, torch.bfloat16):
            got = model(X).logits
    assert got.dtype == torch.bfloat16 and model_float_dtype(model) == torch.float32
    rel = float((got.float() - ref).norm() / ref.norm())
    assert 0 < rel < 0.03  # bfloat16 keeps 8 bits of mantissa: ~2^-8 per op over two blocks
