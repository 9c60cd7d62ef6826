"""Checkpoints saved before the layout move (format v1, `tests/fixtures/make_v1_checkpoints.py` at commit
9e543e1) still load through `from_pretrained` and give the logits they gave when they were saved."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer

import optimum_fair  # noqa: F401  (registers fair_calib and the native LLaDA)
from optimum_fair import FairLinear, calibration_result, reference_kernels, use_kernels
from optimum_fair.eval.generation import generate
from optimum_fair.scoring.prior import PositionPrior

FIXTURES = Path(__file__).parent.parent / "fixtures"
NAMES = ["v1_w4a4_flatquant", "v1_w4a16_gptq_hadamard", "v1_w8a8_rtn"]
# float32 checkpoints: "auto" leaves W4A16 on the reference path (its int4 kernel computes in bfloat16)
KERNEL = {"v1_w4a4_flatquant": "int8_mm", "v1_w4a16_gptq_hadamard": "reference", "v1_w8a8_rtn": "int8_mm"}


@pytest.mark.parametrize("name", NAMES)
def test_v1_checkpoint_reloads_with_identical_logits(name):
    """On the reference path (what they were saved from) the logits are bit-identical."""
    folder = FIXTURES / name
    expected = load_file(str(folder / "expected.safetensors"))
    model = AutoModel.from_pretrained(folder).eval()
    assert any(isinstance(m, FairLinear) for m in model.modules())
    with torch.no_grad(), reference_kernels(model):
        logits = model(expected["input_ids"]).logits
    assert torch.equal(logits, expected["logits"])
    result = calibration_result(model)
    assert result.reloaded and result.blocks == []
    assert (result.prior is not None) == (folder / "prior" / "prior.json").is_file()
    if result.prior is not None:  # the older layout: read from prior/ (its weights carry none)
        assert torch.equal(result.prior.weights, PositionPrior.load(folder / "prior").weights)


@pytest.mark.parametrize("name", NAMES)
def test_v1_checkpoint_runs_on_the_integer_kernels_with_the_same_greedy_decode(name):
    folder = FIXTURES / name
    expected = load_file(str(folder / "expected.safetensors"))
    model = AutoModel.from_pretrained(folder).eval()  # loading picks the kernels
    assert {m.kernel for m in model.modules() if isinstance(m, FairLinear)} == {KERNEL[name]}
    with torch.no_grad():
        logits = model(expected["input_ids"]).logits
    assert (logits - expected["logits"]).abs().max() <= 1e-4 * expected["logits"].abs().max()  # fp32 rounding
    tok = AutoTokenizer.from_pretrained(folder)
    args = dict(gen_length=24, block_length=8)
    on_kernels = generate(model, tok, "the quick brown", **args)
    with reference_kernels(model):
        assert generate(model, tok, "the quick brown", **args) == on_kernels


def test_v1_w4a16_runs_on_the_int4_kernel_when_asked_within_bfloat16_rounding():
    folder = FIXTURES / "v1_w4a16_gptq_hadamard"
    expected = load_file(str(folder / "expected.safetensors"))
    model = AutoModel.from_pretrained(folder).eval()
    assert use_kernels(model, "int4_weight") == {"int4_weight": 14}
    with torch.no_grad():
        logits = model(expected["input_ids"]).logits
    scale = expected["logits"].abs().max()
    assert 0 < (logits - expected["logits"]).abs().max() <= 2e-2 * scale  # bf16: 8 significant bits


def test_v1_fixtures_are_what_the_test_expects():
    # the check above must be able to fail: a changed input gives other logits
    expected = load_file(str(FIXTURES / NAMES[2] / "expected.safetensors"))
    model = AutoModel.from_pretrained(FIXTURES / NAMES[2]).eval()
    ids = expected["input_ids"].clone()
    ids[:, 0] = (ids[:, 0] + 1) % 50
    with torch.no_grad():
        assert not torch.equal(model(ids).logits, expected["logits"])


@pytest.mark.parametrize("name", NAMES)
def test_v1_checkpoint_says_it_was_made_on_the_symmetric_grid(name):
    """Version-1 configs carry no weight_grid: they read as "symmetric", and their RTN scales are max / 7."""
    model = AutoModel.from_pretrained(FIXTURES / name)
    assert model.config.quantization_config.weight_grid == "symmetric"
    assert model.config.quantization_config.version == 1
    if name == "v1_w8a8_rtn":  # plain RTN: every scale is max|w| / 127 of the float weight it came from
        layer = next(m for m in model.modules() if isinstance(m, FairLinear))
        deq = layer.dequantized_weight().float()
        amax = deq.abs().amax(dim=1)  # the top code holds the row's max exactly: 127 * s
        assert torch.allclose(amax, 127 * layer.weight_scale.float()[:, 0], rtol=1e-6)


def test_a_checkpoint_missing_a_float_tensor_is_refused_naming_it(tmp_path):
    import shutil

    from safetensors.torch import save_file

    folder = tmp_path / "broken"
    shutil.copytree(FIXTURES / NAMES[2], folder)
    state = load_file(str(folder / "model.safetensors"))
    name = next(k for k in state if "norm" in k or "ln_f" in k)
    del state[name]
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"{name}: missing from the fair_calib checkpoint.*model.safetensors"):
        AutoModel.from_pretrained(folder)
