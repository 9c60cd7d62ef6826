"""The shipped model quantized, on the integer kernels against the reference path: the same greedy
decode (float32, where the two differ only by fp32 rounding), and a save from the kernel format that
reloads to the same weights."""

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

import optimum_fair
from optimum_fair import FairCalibConfig, FairLinear, reference_kernels
from optimum_fair.eval.generation import generate

QUICK = dict(rounding="rtn", transform="hadamard", weighting="uniform", num_probes=8, num_samples=8)


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(optimum_fair.DEFAULT_MODEL)


@pytest.mark.parametrize("w_bits,a_bits", [(4, 4), (8, 8)])
def test_shipped_model_decodes_the_same_on_the_integer_kernels(w_bits, a_bits, tok, tmp_path):
    config = FairCalibConfig(w_bits=w_bits, a_bits=a_bits, **QUICK)
    model = AutoModel.from_pretrained(optimum_fair.DEFAULT_MODEL, quantization_config=config,
                                      dtype=torch.float32).eval()
    kernels = {m.kernel for m in model.modules() if isinstance(m, FairLinear)}
    assert kernels == {"int8_mm"}
    args = dict(gen_length=32, block_length=8)
    fast = generate(model, tok, "Once upon a time", **args)
    with reference_kernels(model):
        assert generate(model, tok, "Once upon a time", **args) == fast
        ids = tok("The history of the city", return_tensors="pt").input_ids
        with torch.no_grad():
            reference_logits = model(ids).logits

    model.save_pretrained(tmp_path / "q")  # written from the resident int8 codes
    reloaded = AutoModel.from_pretrained(tmp_path / "q").eval()
    assert {m.kernel for m in reloaded.modules() if isinstance(m, FairLinear)} == {"int8_mm"}
    with reference_kernels(reloaded), torch.no_grad():
        assert torch.equal(reloaded(ids).logits, reference_logits)
    assert generate(reloaded, tok, "Once upon a time", **args) == fast
