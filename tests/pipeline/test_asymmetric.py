"""`FairCalibConfig(sym=False)` through the pipeline (issue 31): per-group mins with RTN and GPTQ, packed,
reloaded, written to GGUF as Q4_1 and read back exactly by `gguf`'s own dequantizer."""

from __future__ import annotations

import gguf
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

import optimum_fair
from optimum_fair import FairCalibConfig, quantize
from optimum_fair.export import export
from optimum_fair.grids import asymmetric_grid, round_codes, values
from optimum_fair.nn import FairLinear
from tests.conftest import char_tokenizer, tiny_llada

TEXTS = [f"an asymmetric grid stores line {i} of the calibration text with a min per group." for i in range(32)]
ASYM = dict(sym=False, transform="none", weighting="uniform", a_bits=16, num_samples=8, seq_len=32, window=16,
            block_length=16, num_probes=4)


def _layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, FairLinear)}


@pytest.mark.parametrize("rounding", ["rtn", "gptq"])
def test_asymmetric_layers_hold_mins_and_equal_their_grid(rounding):
    tok = char_tokenizer()
    model = tiny_llada(len(tok), tok.mask_token_id)
    float_w = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    quantize(model, FairCalibConfig(**ASYM, rounding=rounding, group_size=32), tokenizer=tok, texts=TEXTS)
    layers = _layers(model)
    assert layers and all(m.weight_min is not None and m.grid.gguf_type.value == "Q4_1" for m in layers.values())
    for name, layer in layers.items():
        w = float_w[name].float()
        if rounding == "rtn":  # each weight on its own: exactly the grid's search and rounding
            grid = asymmetric_grid(4, 32)
            assert torch.equal(layer.codes(), round_codes(grid, w, layer.weight_scale, layer.weight_min))
        err = (layer.dequantized_weight().float() - w).norm() / w.norm()
        assert err < 0.15, name


def test_asymmetric_beats_symmetric_on_shifted_rows():
    tok = char_tokenizer()
    sym, asym = (tiny_llada(len(tok), tok.mask_token_id) for _ in range(2))
    for model in (sym, asym):
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, torch.nn.Linear):
                    m.weight.add_(0.05)  # rows centred away from zero: what a min is for
    base = dict(rounding="rtn", transform="none", weighting="uniform", a_bits=16, group_size=32)
    quantize(sym, FairCalibConfig(**base), tokenizer=tok)
    quantize(asym, FairCalibConfig(**base, sym=False), tokenizer=tok)
    ref = tiny_llada(len(tok), tok.mask_token_id)
    err = {}
    for label, model in (("sym", sym), ("asym", asym)):
        total = 0.0
        for name, layer in _layers(model).items():
            w = ref.get_submodule(name).weight.detach().float() + 0.05
            total += float(((layer.dequantized_weight().float() - w) ** 2).sum())
        err[label] = total
    assert err["asym"] < 0.8 * err["sym"]


def test_asymmetric_checkpoint_reloads_and_writes_q4_1(tmp_path):
    tok = AutoTokenizer.from_pretrained(optimum_fair.DEFAULT_MODEL)  # GGUF writes byte-level BPE vocabularies
    model = tiny_llada(len(tok), tok.mask_token_id)
    quantize(model, FairCalibConfig(**ASYM, rounding="gptq", group_size=32), tokenizer=tok, texts=TEXTS)
    model.save_pretrained(tmp_path / "m")
    again = AutoModel.from_pretrained(tmp_path / "m")
    ids = torch.randint(4, len(tok), (2, 20), generator=torch.Generator().manual_seed(0))
    assert torch.equal(again(ids).logits, model(ids).logits)
    path = export(model, tmp_path / "m.gguf", "gguf", tokenizer=tok)
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    t = tensors["blk.0.attn_v.weight"]
    assert t.tensor_type is gguf.GGMLQuantizationType.Q4_1
    layer = model.get_submodule("model.transformer.blocks.0.v_proj")
    back = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type)).reshape(layer.out_features, -1)
    assert torch.equal(back, layer.dequantized_weight().float())
    assert torch.equal(back, values(layer.grid, layer.codes(), layer.weight_scale, layer.weight_min))


def test_per_channel_asymmetric_has_no_gguf_type():
    tok = AutoTokenizer.from_pretrained(optimum_fair.DEFAULT_MODEL)
    model = tiny_llada(len(tok), tok.mask_token_id)
    quantize(model, FairCalibConfig(rounding="rtn", transform="none", weighting="uniform", a_bits=16, sym=False),
             tokenizer=tok)
    layer = next(iter(_layers(model).values()))
    assert layer.group_size == -1 and layer.weight_min.shape == (layer.out_features, 1) and layer.grid.gguf_type is None
    with pytest.raises(ValueError, match="no GGUF type holds its codes"):
        export(model, "unused.gguf", "gguf", tokenizer=tok)


def test_compressed_tensors_refuses_float_mins(tmp_path):
    tok = char_tokenizer()
    model = tiny_llada(len(tok), tok.mask_token_id)
    quantize(model, FairCalibConfig(rounding="rtn", transform="none", weighting="uniform", a_bits=16, sym=False,
                                    group_size=32), tokenizer=tok)
    with pytest.raises(ValueError, match="compressed-tensors cannot hold"):
        export(model, tmp_path / "ct", "compressed-tensors", tokenizer=tok)
    assert not (tmp_path / "ct").exists()
