"""Exports read back by their consumers: the GGUF file by the `gguf` package's reader and dequantizer,
the compressed-tensors folder by plain transformers + compressed-tensors (no FairLinear inside)."""

from __future__ import annotations

import json
import logging

import gguf
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModel, AutoTokenizer, CompressedTensorsConfig

import optimum_fair
from optimum_fair import FairCalibConfig, FairLinear
from optimum_fair.cli import main
from optimum_fair.export import export, save_quantized

QUICK = dict(rounding="rtn", weighting="uniform", num_probes=8, num_samples=8)


def _saved(tmp_path_factory, name, **config):
    config = FairCalibConfig(**QUICK, **config)
    model = AutoModel.from_pretrained(optimum_fair.DEFAULT_MODEL, quantization_config=config)
    folder = tmp_path_factory.mktemp("exports") / name
    save_quantized(model, folder)  # the folder with its tokenizer (GGUF needs it)
    return folder, model


@pytest.fixture(scope="module")
def w4a16(tmp_path_factory):  # the shipped model loads in fp16: fp16 scales, an exact GGUF
    return _saved(tmp_path_factory, "w4a16", w_bits=4, a_bits=16, transform="none")


@pytest.fixture(scope="module")
def w8a8(tmp_path_factory):
    return _saved(tmp_path_factory, "w8a8", w_bits=8, a_bits=8, transform="none")


def _fair_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, FairLinear)}


def _interleaved(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's rotary row order, by index: head h, rotate-half row j = e * half + i -> 2 i + e."""
    out = torch.empty_like(rows)
    head_dim = rows.shape[0] // n_head
    half = head_dim // 2
    for h in range(n_head):
        for e in range(2):
            for i in range(half):
                out[h * head_dim + 2 * i + e] = rows[h * head_dim + e * half + i]
    return out


@pytest.mark.parametrize("which,qtype", [("w4a16", "Q4_0"), ("w8a8", "Q8_0")])
def test_gguf_dequantizes_to_our_weights_exactly(which, qtype, request, tmp_path, caplog):
    folder, model = request.getfixturevalue(which)
    with caplog.at_level(logging.WARNING):
        out = export(folder, tmp_path / "model.gguf", "gguf")
    assert ("activation bits [8] dropped" in caplog.text) == (which == "w8a8")
    reader = gguf.GGUFReader(str(out))
    tensors = {t.name: t for t in reader.tensors}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLADA, model.config.n_layers)
    layers = _fair_layers(model)
    assert len(tensors) == len(model.state_dict()) - len(layers)  # one tensor per weight, scales inside
    for name, layer in layers.items():
        t = tensors[names.get_name(name + ".weight", try_suffixes=(".weight",))]
        assert t.tensor_type.name == qtype
        ours = layer.codes().float() * layer.weight_scale.float()  # (out, in), exact in fp32
        leaf = name.rpartition(".")[2]
        if leaf in ("q_proj", "k_proj"):
            ours = _interleaved(ours, model.config.n_heads)
        assert torch.equal(torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type)), ours), name
    emb = tensors["token_embd.weight"]
    assert emb.tensor_type.name == "F32"
    assert torch.equal(torch.from_numpy(emb.data.copy()).float(), model.get_input_embeddings().weight.float())

    def field(key):
        f = reader.fields[key]
        return f.contents()

    assert field("general.architecture") == "llada" and field("llada.block_count") == model.config.n_layers
    assert field("llada.attention.causal") is False and field("diffusion.shift_logits") is False
    assert field("tokenizer.ggml.mask_token_id") == model.config.mask_token_id
    assert field("tokenizer.ggml.model") == "gpt2" and len(field("tokenizer.ggml.tokens")) == 1024
    assert field("tokenizer.ggml.tokens")[model.config.mask_token_id] == "<|mask|>"
    assert len(field("tokenizer.ggml.merges")) > 0


def test_compressed_tensors_loads_in_plain_transformers_with_our_weights(w4a16, w8a8, tmp_path):
    ids = torch.randint(4, 1000, (1, 40), generator=torch.Generator().manual_seed(0))
    for (folder, model), scheme in [(w4a16, "pack-quantized"), (w8a8, "int-quantized")]:
        out = export(folder, tmp_path / scheme, "compressed-tensors")
        config = json.loads((out / "config.json").read_text())["quantization_config"]
        assert config["quant_method"] == "compressed-tensors" and config["format"] == scheme
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            keys = set(f.keys())
            packed = f.get_tensor("model.transformer.blocks.0.q_proj.weight_packed") if scheme == "pack-quantized" \
                else f.get_tensor("model.transformer.blocks.0.q_proj.weight")
        assert packed.dtype == (torch.int32 if scheme == "pack-quantized" else torch.int8)
        assert "model.transformer.blocks.0.q_proj.weight_scale" in keys
        compressed = AutoModel.from_pretrained(out, dtype=torch.float32).eval()  # runs the compressed layers
        assert not _fair_layers(compressed)
        loaded = AutoModel.from_pretrained(out, dtype=torch.float32,  # compressed-tensors decompresses
                                           quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
        for name, layer in _fair_layers(model).items():
            w = loaded.get_submodule(name).weight.float()
            assert torch.equal(w, layer.dequantized_weight().float()), name  # codes * scale in the scale dtype
        if scheme == "pack-quantized":  # weight-only: the same network in float32
            reference = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
            with torch.no_grad():
                torch.testing.assert_close(compressed(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)


def test_export_refuses_bad_input_before_writing(w4a16, tmp_path_factory, tmp_path):
    folder, _ = w4a16
    hadamard, _ = _saved(tmp_path_factory, "hadamard", w_bits=4, a_bits=16, transform="hadamard")
    for fmt in ("gguf", "compressed-tensors"):
        with pytest.raises(ValueError, match=r"model\.transformer\.blocks\.0\.\w+: has an online transform"):
            export(hadamard, tmp_path / f"h.{fmt}", fmt)
        assert not (tmp_path / f"h.{fmt}").exists()
    (tmp_path / "taken.gguf").write_text("mine")
    with pytest.raises(FileExistsError, match="taken.gguf exists; pass overwrite=True"):
        export(folder, tmp_path / "taken.gguf", "gguf")
    assert (tmp_path / "taken.gguf").read_text() == "mine"
    with pytest.raises(ValueError, match="format must be one of"):
        export(folder, tmp_path / "x", "onnx")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        export(tmp_path, tmp_path / "y.gguf", "gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.gguf"]  # no partial file anywhere


def test_cli_export(w8a8, tmp_path, capsys):
    folder, _ = w8a8
    out = tmp_path / "m.gguf"
    assert main(["export", str(folder), "--format", "gguf", "--output", str(out)]) == 0
    assert gguf.GGUFReader(str(out)).fields["general.architecture"].contents() == "llada"
    assert main(["export", str(folder), "--format", "gguf", "--output", str(out)]) == 1
    assert "exists; pass overwrite=True" in capsys.readouterr().err
    assert main(["export", str(folder), "--format", "gguf", "--output", str(out), "--overwrite"]) == 0


def _tiny_dream(tok, dtype=torch.float32):
    from optimum_fair import quantize
    from optimum_fair.modeling import DreamConfig, DreamModel

    torch.manual_seed(0)
    config = DreamConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         mask_token_id=tok.mask_token_id, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = DreamModel(config).eval().to(dtype)
    return quantize(model, FairCalibConfig(w_bits=4, a_bits=16, transform="none", **QUICK), tokenizer=tok)


def test_gguf_of_a_dream_keeps_its_rows_biases_and_logit_shift(tmp_path, caplog):
    tok = AutoTokenizer.from_pretrained(optimum_fair.DEFAULT_MODEL)  # byte-level BPE, as GGUF needs
    model = _tiny_dream(tok)
    save_quantized(model, tmp_path / "dream")  # the folder with its tokenizer (GGUF needs it)
    with caplog.at_level(logging.WARNING):
        reader = gguf.GGUFReader(str(export(tmp_path / "dream", tmp_path / "dream.gguf", "gguf")))
    rounded = [r.getMessage() for r in caplog.records if "rounded to GGUF's fp16" in r.getMessage()]
    assert len(rounded) == 1 and "14 of 14 layers have float32 scales" in rounded[0]  # one line per export
    assert reader.fields["general.architecture"].contents() == "dream"
    assert reader.fields["diffusion.shift_logits"].contents() is True
    assert reader.fields["dream.attention.head_count_kv"].contents() == 2
    tensors = {t.name: t for t in reader.tensors}
    q = model.model.layers[0].self_attn.q_proj
    t = tensors["blk.0.attn_q.weight"]
    ours = q.codes().float() * q.weight_scale.half().float()  # rows as they are: rotate-half in llama.cpp too
    assert torch.equal(torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type)), ours)
    assert torch.equal(torch.from_numpy(tensors["blk.0.attn_q.bias"].data.copy()), q.bias.float())


def test_gguf_refuses_a_tokenizer_that_is_not_byte_level_bpe(tmp_path):
    from tests.conftest import char_tokenizer

    tok = char_tokenizer()
    model = _tiny_dream(tok)
    with pytest.raises(ValueError, match="byte-level BPE.*this tokenizer is WordLevel"):
        export(model, tmp_path / "dream.gguf", "gguf", tokenizer=tok)
    assert not (tmp_path / "dream.gguf").exists()


def test_gguf_type_model_exports_its_codes_exactly_with_signed_scales(q4_0, tmp_path, caplog):
    folder, model = q4_0
    layers = _fair_layers(model)
    scales = torch.cat([m.weight_scale.flatten() for m in layers.values()])
    assert (scales < 0).any() and torch.equal(scales.half().float(), scales.float())
    with caplog.at_level(logging.WARNING):
        out = export(folder, tmp_path / "q4_0.gguf", "gguf")
    assert "rounded" not in caplog.text  # nothing re-quantized: the file holds the calibrated grid
    tensors = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLADA, model.config.n_layers)
    for name, layer in layers.items():
        t = tensors[names.get_name(name + ".weight", try_suffixes=(".weight",))]
        ours = layer.codes().float() * layer.weight_scale.float().repeat_interleave(32, dim=1)  # (out, in)
        if name.rpartition(".")[2] in ("q_proj", "k_proj"):
            ours = _interleaved(ours, model.config.n_heads)
        assert t.tensor_type.name == "Q4_0"
        assert torch.equal(torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type)), ours), name
    reloaded = AutoModel.from_pretrained(folder)  # negative scales pass the load checks
    for name, layer in _fair_layers(reloaded).items():
        assert torch.equal(layer.dequantized_weight(), layers[name].dequantized_weight()), name
    ct = AutoModel.from_pretrained(export(folder, tmp_path / "ct", "compressed-tensors"), dtype=torch.float32,
                                   quantization_config=CompressedTensorsConfig(dequantize=True))
    for name, layer in layers.items():
        assert torch.equal(ct.get_submodule(name).weight.float(), layer.dequantized_weight().float()), name
