import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from optimum_fair import FairCalibConfig, FairLinear, calibration_result, quantize

X = torch.randint(0, 100, (2, 12))


def _logits(model):
    with torch.no_grad():
        return model(X).logits


def _fair_names(model):
    return {n for n, m in model.named_modules() if isinstance(m, FairLinear)}


BLOCK_LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def test_from_pretrained_quantizes_every_block(tiny_llama_dir):
    config = FairCalibConfig(rounding="rtn", transform="none")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=config)
    expected = {f"model.layers.{i}.{n}" for i in range(2) for n in BLOCK_LINEARS}
    assert _fair_names(model) == expected
    assert type(model.lm_head) is torch.nn.Linear  # skipped by default
    assert model.config.quantization_config.modules_to_not_convert == ["lm_head"]


def test_one_liner_equals_quantize(tiny_llama_dir, tiny_llama):
    cfg = dict(rounding="rtn", transform="none", w_bits=4, a_bits=8, group_size=16)
    loaded = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=FairCalibConfig(**cfg))
    direct = quantize(tiny_llama, FairCalibConfig(**cfg))
    assert torch.equal(_logits(loaded), _logits(direct))
    sd1, sd2 = loaded.state_dict(), direct.state_dict()
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)


@pytest.mark.parametrize("w_bits,a_bits,group_size", [(4, 4, -1), (4, 16, 32), (8, 8, -1)])
def test_save_reload_identical(tmp_path, tiny_llama_dir, w_bits, a_bits, group_size):
    cfg = FairCalibConfig(rounding="rtn", transform="none", w_bits=w_bits, a_bits=a_bits, group_size=group_size)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=cfg)
    before = _logits(model)
    model.save_pretrained(tmp_path / "q")
    files = sorted(p.name for p in (tmp_path / "q").iterdir())
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt")) for f in files)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert _fair_names(reloaded) == _fair_names(model)
    assert torch.equal(_logits(reloaded), before)
    # reloading never calibrates: the saved config records the format and reload keeps it
    assert reloaded.config.quantization_config.to_dict() == model.config.quantization_config.to_dict()


def test_quantized_logits_differ_from_fp_but_stay_close(tiny_llama_dir, tiny_llama):
    fp = _logits(tiny_llama)
    q = _logits(AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=FairCalibConfig(
        rounding="rtn", transform="none", w_bits=8, a_bits=8)))
    assert not torch.equal(fp, q)
    assert (fp - q).abs().max() < 0.1 * fp.abs().max()


def test_unknown_skip_name(tiny_llama_dir):
    with pytest.raises(ValueError, match="modules_to_not_convert.*nonexistent"):
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=FairCalibConfig(
            rounding="rtn", modules_to_not_convert=["nonexistent"]))


def test_custom_skip_keeps_modules(tiny_llama):
    config = FairCalibConfig(rounding="rtn", transform="none", modules_to_not_convert=["lm_head", "down_proj"])
    quantize(tiny_llama, config)
    assert type(tiny_llama.model.layers[0].mlp.down_proj) is torch.nn.Linear
    assert isinstance(tiny_llama.model.layers[0].mlp.up_proj, FairLinear)


def test_group_size_not_dividing(tiny_llama):
    with pytest.raises(ValueError, match="group_size 48"):
        quantize(tiny_llama, FairCalibConfig(rounding="rtn", transform="none", group_size=48))


def _save_quantized(tiny_llama, path):
    quantize(tiny_llama, FairCalibConfig(rounding="rtn", transform="none"))
    tiny_llama.save_pretrained(path)
    return path / "model.safetensors"


def test_wrong_packed_shape_names_tensor(tmp_path, tiny_llama):
    file = _save_quantized(tiny_llama, tmp_path / "q")
    sd = load_file(file)
    key = "model.layers.1.mlp.up_proj.weight"
    sd[key] = sd[key][:-3].clone()
    save_file(sd, file, metadata={"format": "pt"})
    with pytest.raises(Exception, match="up_proj"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "q")


def test_wrong_packed_dtype_names_tensor(tmp_path, tiny_llama):
    file = _save_quantized(tiny_llama, tmp_path / "q")
    sd = load_file(file)
    key = "model.layers.0.self_attn.k_proj.weight"
    sd[key] = sd[key].to(torch.int16)
    save_file(sd, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="k_proj.weight"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "q")


@pytest.mark.parametrize("w_bits", [4, 8])
def test_loading_without_import_fails_loudly(tmp_path, tiny_llama, w_bits):
    quantize(tiny_llama, FairCalibConfig(rounding="rtn", transform="none", w_bits=w_bits, a_bits=8))
    tiny_llama.save_pretrained(tmp_path / "q")
    code = (f"from transformers import AutoModelForCausalLM\n"
            f"AutoModelForCausalLM.from_pretrained({str(tmp_path / 'q')!r})\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode != 0
    assert "mismatch" in out.stderr.lower() and "q_proj.weight" in out.stderr


def test_quantize_sets_only_what_transformers_sets_and_keeps_the_callers_config(tiny_llama):
    config = FairCalibConfig(rounding="rtn", transform="none")
    before = set(vars(tiny_llama))
    quantize(tiny_llama, config)
    added = set(vars(tiny_llama)) - before
    # transformers' own quantized-model attributes and its Hub tags (add_model_tags); save_pretrained and
    # push_to_hub stay the class's (the prior travels through the quantizer's save hook)
    assert added == {"hf_quantizer", "is_quantized", "quantization_method", "model_tags"}
    assert config.modules_to_not_convert is None  # the caller's config is not mutated
    result = calibration_result(tiny_llama)
    assert result.config is not config and result.config.modules_to_not_convert == ["lm_head"]
    assert tiny_llama.config.quantization_config is result.config
    assert result.prior is None and result.blocks == [] and not result.reloaded
