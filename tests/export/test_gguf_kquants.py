"""Calibrating for llama.cpp's K-quant mixes and writing them (issue 31): each block linear in the type
llama-quantize gives it (Q4_K / Q5_K / Q6_K / IQ4_XS / IQ4_NL, and the fallbacks of 704-wide rows), read back
exactly by `gguf`'s own dequantizer, and a saved checkpoint reloading into the same per-layer grids."""

from __future__ import annotations

import gguf
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

import optimum_fair
from optimum_fair import FairCalibConfig
from optimum_fair.enums import GGUFType
from optimum_fair.export import export
from optimum_fair.export.gguf_file import rotary_permute
from optimum_fair.nn import FairLinear

T = gguf.GGMLQuantizationType
# what llama-quantize wrote for the shipped model (llama.cpp from llama-cpp-python 0.3.36): the embedding,
# the other block linears, attn_v and ffn_down per layer
LLAMA = {
    "Q4_K_M": ("Q4_K", "Q4_K", ["Q4_K", "Q4_K", "Q6_K", "Q6_K"], ["Q5_0", "Q5_0", "Q8_0", "Q8_0"]),
    "Q5_K_M": ("Q5_K", "Q5_K", ["Q5_K", "Q5_K", "Q6_K", "Q6_K"], ["Q5_1", "Q5_1", "Q8_0", "Q8_0"]),
    "Q6_K": ("Q6_K", "Q6_K", ["Q6_K"] * 4, ["Q8_0"] * 4),
    "IQ4_XS": ("IQ4_XS", "IQ4_XS", ["IQ4_XS"] * 4, ["IQ4_NL"] * 4),
    "IQ4_NL": ("IQ4_NL", "IQ4_NL", ["IQ4_NL"] * 4, ["IQ4_NL"] * 4),
}
NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "attn_out": "attn_output",
         "ff_proj": "ffn_gate", "up_proj": "ffn_up", "ff_out": "ffn_down"}


@pytest.fixture(scope="module")
def q4_k_m():
    config = FairCalibConfig(gguf_type="Q4_K_M", rounding="gptq", weighting="uniform", num_samples=4, num_probes=4)
    return AutoModel.from_pretrained(optimum_fair.DEFAULT_MODEL, dtype=torch.float32, quantization_config=config)


@pytest.mark.parametrize("mix", list(LLAMA))
def test_mix_file_has_llama_quantizes_layout_and_our_codes_exactly(mix, q4_k_m, tmp_path):
    tok = AutoTokenizer.from_pretrained(optimum_fair.DEFAULT_MODEL)
    model = q4_k_m if mix == "Q4_K_M" else AutoModel.from_pretrained(  # RTN: no data needed
        optimum_fair.DEFAULT_MODEL, dtype=torch.float32,
        quantization_config=FairCalibConfig(gguf_type=mix, rounding="rtn", weighting="uniform"))
    path = export(model, tmp_path / "m.gguf", "gguf", tokenizer=tok, gguf_type=mix)
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    assert reader.fields["general.file_type"].contents() == getattr(gguf.LlamaFileType, f"MOSTLY_{mix}")
    embedding, base, attn_v, ffn_down = LLAMA[mix]
    assert tensors["token_embd.weight"].tensor_type.name == embedding
    assert tensors["output.weight"].tensor_type is T.Q6_K
    assert [int(n) for n in tensors["token_embd.weight"].shape] == [256, 1024]
    heads = model.config.n_heads
    for name, layer in model.named_modules():
        if not isinstance(layer, FairLinear):
            continue
        index, leaf = int(name.split(".")[3]), name.rsplit(".", 1)[1]
        t = tensors[f"blk.{index}.{NAMES[leaf]}.weight"]
        want = {"attn_v": attn_v[index], "ffn_down": ffn_down[index]}.get(NAMES[leaf], base)
        assert t.tensor_type.name == want, name
        assert [int(n) for n in t.shape] == [layer.in_features, layer.out_features], name  # 2-D, as llama.cpp reads
        ours = layer.dequantized_weight().float()
        if leaf in ("q_proj", "k_proj"):
            ours = rotary_permute(ours, heads)
        back = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type)).reshape(ours.shape)
        assert torch.equal(back, ours), name
    emb = model.get_input_embeddings().weight.float()  # rounded to the mix's type before calibration
    back = torch.from_numpy(gguf.quants.dequantize(tensors["token_embd.weight"].data, T[embedding])).reshape(emb.shape)
    moved = (back != emb).any(-1)  # rows whose search, run again on rounded values, picks another grid
    assert int(moved.sum()) <= 2, int(moved.sum())  # Q5_K: one row of 1024 alternates between two grids
    assert ((back - emb)[moved].abs().max() if moved.any() else 0) < 0.01


def test_q4_k_m_checkpoint_reloads_into_the_same_grids(q4_k_m, tmp_path):
    q4_k_m.save_pretrained(tmp_path)
    again = AutoModel.from_pretrained(tmp_path, dtype=torch.float32)
    for name, layer in q4_k_m.named_modules():
        if isinstance(layer, FairLinear):
            other = again.get_submodule(name)
            assert (other.w_bits, other.group_size, other.weight_min is None) == \
                (layer.w_bits, layer.group_size, layer.weight_min is None), name
            assert torch.equal(other.dequantized_weight(), layer.dequantized_weight()), name
    ids = torch.randint(4, 1000, (1, 24), generator=torch.Generator().manual_seed(0))
    assert torch.equal(again(ids).logits, q4_k_m(ids).logits)


def test_fallbacks_are_said_once(caplog):
    config = FairCalibConfig(gguf_type="Q4_K_M", rounding="rtn", weighting="uniform")
    with caplog.at_level("INFO", logger="optimum_fair.pipeline.surgery"):
        AutoModel.from_pretrained(optimum_fair.DEFAULT_MODEL, dtype=torch.float32, quantization_config=config)
    said = [r.getMessage() for r in caplog.records if "fallback" in r.getMessage()]
    assert said == ["Q4_K_M: ff_out have rows that are not a multiple of 256 weights: calibrated in llama.cpp's "
                    "fallback types (Q5_0, Q8_0), as llama-quantize writes them"]


def test_a_model_too_narrow_for_k_quants_takes_the_fallbacks():
    from optimum_fair.export.gguf_types import layer_type
    from tests.conftest import char_tokenizer, tiny_llada

    tok = char_tokenizer()
    model = tiny_llada(len(tok), tok.mask_token_id)  # 64 / 96 wide: no row is a multiple of 256
    emb = model.get_input_embeddings().weight.detach().clone()
    from optimum_fair import quantize
    from optimum_fair.export.gguf_types import rounded

    quantize(model, FairCalibConfig(gguf_type="Q4_K_M", rounding="rtn", weighting="uniform"), tokenizer=tok)
    types = {layer_type(m.w_bits, m.grid) for m in model.modules() if isinstance(m, FairLinear)}
    assert types == {GGUFType.Q5_0, GGUFType.Q8_0}  # Q4_K -> Q5_0, Q6_K (more bits) -> Q8_0
    assert torch.equal(model.get_input_embeddings().weight, rounded(emb, GGUFType.Q5_0))


def test_resume_cache_reloads_k_quant_blocks(tmp_path, caplog):
    config = FairCalibConfig(gguf_type="Q4_K_M", rounding="gptq", weighting="uniform", num_samples=4, num_probes=4,
                             cache_dir=str(tmp_path / "cache"))
    first = AutoModel.from_pretrained(optimum_fair.DEFAULT_MODEL, dtype=torch.float16, quantization_config=config)
    with caplog.at_level("INFO", logger="optimum_fair.pipeline.stage2"):
        again = AutoModel.from_pretrained(optimum_fair.DEFAULT_MODEL, dtype=torch.float16, quantization_config=config)
    assert sum("loaded from cache" in r.getMessage() for r in caplog.records) == 4  # every block
    for name, layer in first.named_modules():
        if isinstance(layer, FairLinear):
            other = again.get_submodule(name)
            assert other.weight_scale.dtype == layer.weight_scale.dtype, name  # float32 on K grids, fp16 on Q5_0
            assert torch.equal(other.dequantized_weight(), layer.dequantized_weight()), name
