"""GGUF types the export writes itself and llama.cpp's mixes (issue 31), each read back by `gguf`'s own
dequantizer; the quantized ones compared with `gguf`'s quantizer or a plain-loop reference."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

import optimum_fair
from optimum_fair.enums import GGUFType
from optimum_fair.export import export
from optimum_fair.export.gguf_types import encode, mix_for
from tests.conftest import tiny_llada

T = gguf.GGMLQuantizationType


def _weights(out=48, n=512, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, n, generator=g) * torch.rand(out, 1, generator=g)


def _decoded(w: torch.Tensor, qtype: GGUFType) -> torch.Tensor:
    data, raw = encode(w, qtype)
    back = data.astype(np.float32) if raw is None else gguf.quants.dequantize(data, T[raw])
    return torch.from_numpy(np.array(back)).reshape(w.shape)


def _row_err(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a - b) ** 2).sum(-1)  # (rows,)


@pytest.mark.parametrize("qtype, cast", [(GGUFType.F32, torch.float32), (GGUFType.F16, torch.float16),
                                         (GGUFType.BF16, torch.bfloat16)])
def test_float_types_are_the_plain_casts(qtype, cast):
    w = _weights()
    assert torch.equal(_decoded(w, qtype), w.to(cast).float())


@pytest.mark.parametrize("qtype", [GGUFType.Q4_0, GGUFType.Q8_0])
def test_block_types_are_never_worse_than_gguf_reference_rounding(qtype):
    w = _weights()
    ref = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), T[qtype.value]), T[qtype.value]))
    ours = _decoded(w, qtype)
    assert (_row_err(ours, w) <= _row_err(ref, w) * (1 + 1e-5) + 1e-12).all()


def _q6_k_plain(w: torch.Tensor) -> torch.Tensor:
    """Q6_K by a plain loop, without search: sub-scale = signed max / -32, d = signed largest / -128."""
    out = torch.empty_like(w)
    for r in range(w.shape[0]):
        for s0 in range(0, w.shape[1], 256):
            x = w[r, s0:s0 + 256].reshape(16, 16)
            sub = [float(v[v.abs().argmax()]) / -32 for v in x]
            m = max(sub, key=abs)
            d = float(torch.tensor(m / -128).half())
            for j, v in enumerate(x):
                step = d * min(max(round(sub[j] / d), -128), 127)
                q = (v / step).round().clamp(-32, 31) if step else torch.zeros(16)
                out[r, s0 + 16 * j:s0 + 16 * j + 16] = q * step
    return out


def test_q6_k_reads_back_through_gguf_and_beats_plain_rounding():
    w = _weights(16, 512)
    ours = _decoded(w, GGUFType.Q6_K)
    plain = _q6_k_plain(w)
    assert ((ours - w).norm() / w.norm()) < 0.02  # six bits: ~1.7 % relative error on Gaussian rows
    assert _row_err(ours, w).sum() < 0.9 * _row_err(plain, w).sum()
    assert ((plain - w).norm() / w.norm()) < 0.03  # the reference itself is a sane Q6_K
    with pytest.raises(ValueError, match="multiple of 256"):
        encode(_weights(4, 96), GGUFType.Q6_K)


def test_mixes_follow_llama_quantize():
    q4 = mix_for("Q4_0")
    assert (q4.blocks, q4.embedding, q4.head_type(256), q4.head_type(96)) == (
        GGUFType.Q4_0, GGUFType.Q4_0, GGUFType.Q6_K, GGUFType.Q8_0)  # Q8_0 where rows are not 256-wide
    assert mix_for("Q8_0").head_type(256) is GGUFType.Q8_0
    assert mix_for("F16").head_type(256) is GGUFType.F16
    km = mix_for("Q4_K_M")
    assert (km.embedding, km.head_type(256), km.head_type(96)) == (GGUFType.Q4_K, GGUFType.Q6_K, GGUFType.Q8_0)
    accepted = r"\['F32', 'F16', 'BF16', 'Q4_0', 'Q8_0', 'Q4_K_M', 'Q5_K_M', 'Q6_K', 'IQ4_NL', 'IQ4_XS'\]"
    with pytest.raises(ValueError, match=r"must be one of " + accepted):
        mix_for("Q2_K")


def _tensors(path):
    reader = gguf.GGUFReader(str(path))
    return {t.name: t for t in reader.tensors}, reader


def test_q4_0_mix_quantizes_the_ends_and_keeps_the_codes(q4_0, tmp_path):
    folder, model = q4_0
    plain, _ = _tensors(export(folder, tmp_path / "plain.gguf", "gguf"))
    mixed_path = export(folder, tmp_path / "mix.gguf", "gguf", gguf_type="Q4_0")
    mixed, reader = _tensors(mixed_path)
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_0
    assert reader.fields["general.quantization_version"].contents() == gguf.GGML_QUANT_VERSION
    assert mixed["token_embd.weight"].tensor_type is T.Q4_0 and mixed["output.weight"].tensor_type is T.Q6_K
    assert mixed["output_norm.weight"].tensor_type is T.F32
    for name, t in plain.items():
        if name not in ("token_embd.weight", "output.weight"):
            assert t.tensor_type is mixed[name].tensor_type and np.array_equal(t.data, mixed[name].data), name
    emb = model.get_input_embeddings().weight.float()  # rounded to Q4_0 before calibration
    back = torch.from_numpy(gguf.quants.dequantize(mixed["token_embd.weight"].data, T.Q4_0))
    assert torch.equal(back, emb)  # so the mix writes it exactly
    teacher = AutoModel.from_pretrained(optimum_fair.DEFAULT_MODEL, dtype=torch.float32)
    fp_emb = teacher.get_input_embeddings().weight
    assert 0 < ((emb - fp_emb).norm() / fp_emb.norm()) < 0.12  # four bits, blocks of 32
    assert mixed_path.stat().st_size < 0.62 * (tmp_path / "plain.gguf").stat().st_size


def test_unquantized_export_of_a_float_model(tmp_path):
    tok = AutoTokenizer.from_pretrained(optimum_fair.DEFAULT_MODEL)
    model = tiny_llada(len(tok), tok.mask_token_id)
    tensors, reader = _tensors(export(model, tmp_path / "f16.gguf", "gguf", tokenizer=tok, gguf_type="F16"))
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_F16
    kinds = {name: t.tensor_type for name, t in tensors.items()}
    assert {kinds[n] for n in kinds if n.endswith("norm.weight")} == {T.F32}
    assert kinds["token_embd.weight"] is T.F16 and kinds["output.weight"] is T.F16
    assert kinds["blk.0.ffn_down.weight"] is T.F16
    head = torch.from_numpy(np.array(tensors["output.weight"].data)).float()
    assert torch.equal(head, model.get_output_embeddings().weight.detach().half().float())


def test_type_mismatches_are_refused_before_writing(q4_0, tmp_path):
    folder, _ = q4_0
    cases = [
        (folder, dict(gguf_type="F16"), "a float type writes an unquantized model"),
        (folder, dict(gguf_type="Q8_0"), "stores its block linears as \\['Q8_0'\\], this layer's codes are Q4_0"),
        (folder, dict(gguf_type="Q2_K"), "gguf_type must be one of"),
    ]
    for source, kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            export(source, tmp_path / "x.gguf", "gguf", **kwargs)
    with pytest.raises(ValueError, match="gguf_type is a GGUF setting"):
        export(folder, tmp_path / "ct", "compressed-tensors", gguf_type="Q4_0")
    tok = AutoTokenizer.from_pretrained(optimum_fair.DEFAULT_MODEL)
    with pytest.raises(ValueError, match="no FairLinear layers.*F32 / F16 / BF16"):
        export(tiny_llada(len(tok), tok.mask_token_id), tmp_path / "x.gguf", "gguf", tokenizer=tok, gguf_type="Q4_0")
    assert not any(tmp_path.iterdir())


def test_cli_export_type(q4_0, tmp_path, capsys):
    from optimum_fair.cli import main

    folder, _ = q4_0
    out = str(tmp_path / "m.gguf")
    assert main(["export", str(folder), "--format", "gguf", "--output", out, "--type", "Q4_0"]) == 0
    assert "wrote" in capsys.readouterr().out
    tensors, _ = _tensors(tmp_path / "m.gguf")
    assert tensors["output.weight"].tensor_type is T.Q6_K


def test_a_failed_calibration_gives_the_float_embedding_back():
    from optimum_fair import FairCalibConfig, quantize

    tok = AutoTokenizer.from_pretrained(optimum_fair.DEFAULT_MODEL)
    model = tiny_llada(len(tok), tok.mask_token_id)
    before = model.get_input_embeddings().weight.detach().clone()
    with pytest.raises(ValueError, match="token"):  # far too little text for one calibration window
        quantize(model, FairCalibConfig(gguf_type="Q4_0", rounding="gptq", weighting="uniform", num_samples=4,
                                        seq_len=32), texts=["too short"], tokenizer=tok)
    assert torch.equal(model.get_input_embeddings().weight, before)


def test_export_without_a_type_names_the_calibrated_one(q4_0, tmp_path, caplog):
    import logging

    folder, _ = q4_0
    with caplog.at_level(logging.WARNING):
        export(folder, tmp_path / "plain.gguf", "gguf")
    assert "calibrated for Q4_0" in caplog.text and "gguf_type='Q4_0'" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        export(folder, tmp_path / "mix.gguf", "gguf", gguf_type="Q4_0")
    assert "calibrated for" not in caplog.text


def test_a_failure_after_the_head_refit_gives_the_float_head_back(monkeypatch):
    """input_mode="corrected" changes the float LM head at the end of calibration; a failure after that puts
    the user's head (and the embedding) back."""
    from optimum_fair import FairCalibConfig, quantize
    from optimum_fair.pipeline import calibration

    tok = AutoTokenizer.from_pretrained(optimum_fair.DEFAULT_MODEL)
    model = tiny_llada(len(tok), tok.mask_token_id)
    head, embedding = (m.weight.detach().clone() for m in (model.get_output_embeddings(),
                                                           model.get_input_embeddings()))
    refit = calibration.refit_head

    def refit_then_fail(model, *args):
        assert refit(model, *args)  # the head did change
        raise RuntimeError("killed after the head refit")

    monkeypatch.setattr(calibration, "refit_head", refit_then_fail)
    with pytest.raises(RuntimeError, match="after the head refit"):
        quantize(model, FairCalibConfig(gguf_type="Q4_0", rounding="gptq", weighting="uniform", num_samples=4,
                                        seq_len=32, batch_size=4, input_mode="corrected"), tokenizer=tok)
    assert torch.equal(model.get_output_embeddings().weight, head)
    assert torch.equal(model.get_input_embeddings().weight, embedding)


def test_corrected_inputs_start_the_fp_stream_from_the_float_embedding(monkeypatch):
    """A GGUF target rounds the token embedding before calibration; under input_mode="corrected" the FP
    stream of block 0 still comes from the float embedding (so block 0 corrects towards it), the quantized
    stream from the rounded one, and the model keeps the rounded one."""
    from optimum_fair import FairCalibConfig, quantize
    from optimum_fair.export import gguf_types
    from optimum_fair.pipeline import calibration

    tok = AutoTokenizer.from_pretrained(optimum_fair.DEFAULT_MODEL)
    model = tiny_llada(len(tok), tok.mask_token_id)
    float_embedding = model.get_input_embeddings().weight.detach().clone()
    seen = {}
    real = calibration.calibrate_blocks

    def spy(blocks, groups_of, hidden, *args, **kwargs):
        seen.update(hidden=hidden, fp_hidden=kwargs["fp_hidden"])
        return real(blocks, groups_of, hidden, *args, **kwargs)

    monkeypatch.setattr(calibration, "calibrate_blocks", spy)
    quantize(model, FairCalibConfig(gguf_type="Q4_0", rounding="gptq", weighting="uniform", num_samples=4,
                                    seq_len=32, batch_size=4, input_mode="corrected", dataset="lee"), tokenizer=tok)
    rounded = gguf_types.rounded(float_embedding, gguf_types.GGUFType.Q4_0)
    assert torch.equal(model.get_input_embeddings().weight, rounded)
    # LLaDA's first block reads the embedding rows of the (masked) calibration states as they are
    rows_fp, rows_q = seen["fp_hidden"].reshape(-1, rounded.shape[1]), seen["hidden"].reshape(-1, rounded.shape[1])
    assert not torch.equal(rows_fp, rows_q)
    assert torch.isin(rows_fp[:, 0], float_embedding[:, 0]).all() and torch.isin(rows_q[:, 0], rounded[:, 0]).all()
