"""The pure parts of benchmarks/gguf_vs_llamacpp.py (no llama.cpp): GGUF read back into a float LLaDA,
bits per weight, the imatrix text and the rows' reference pairing."""

from __future__ import annotations

import sys
from pathlib import Path

import gguf
import pytest
import torch
from transformers import AutoTokenizer

import optimum_fair
from optimum_fair import FairCalibConfig, FairLinear, quantize
from optimum_fair.export import export
from optimum_fair.export.gguf_file import rotary_permute, write_gguf
from tests.conftest import tiny_llada

BENCH = Path(__file__).resolve().parents[1]  # benchmarks/


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import gguf_readback
    import gguf_vs_llamacpp

    yield gguf_readback, gguf_vs_llamacpp
    for name in ("gguf_readback", "gguf_vs_llamacpp"):
        sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def shipped_tok():
    return AutoTokenizer.from_pretrained(optimum_fair.DEFAULT_MODEL)  # byte-level BPE, as GGUF needs


def test_inverse_rotary_undoes_the_export_permutation(bench):
    readback, _ = bench
    rows = torch.randn(64, 5)
    assert torch.equal(readback.inverse_rotary(rotary_permute(rows, 4), 4), rows)


def test_readback_of_a_q4_0_export_is_the_models_dequantized_weights(bench, shipped_tok, tmp_path):
    readback, _ = bench
    model = tiny_llada(len(shipped_tok), shipped_tok.mask_token_id).half()  # fp16 scales: an exact GGUF
    quantize(model, FairCalibConfig(rounding="rtn", transform="none", weighting="uniform", w_bits=4, a_bits=16,
                                    group_size=32, num_samples=8, seq_len=32), tokenizer=shipped_tok)
    model.save_pretrained(tmp_path / "q")
    path = export(model, tmp_path / "q.gguf", "gguf", tokenizer=shipped_tok)
    back = readback.gguf_readback(path, tmp_path / "q").state_dict()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, FairLinear)}
    assert len(layers) == 2 * 7
    for name, layer in layers.items():
        scale = layer.weight_scale.float().repeat_interleave(32, dim=1)  # (out, in / 32) -> (out, in)
        assert torch.equal(back[name + ".weight"], layer.codes().float() * scale), name  # exact in float32
    for name in ("model.transformer.wte.weight", "model.transformer.ff_out.weight",
                 "model.transformer.blocks.1.attn_norm.weight"):
        assert torch.equal(back[name], model.state_dict()[name].float()), name
    bits = readback.file_bits(path, 1000)
    assert bits["bpw_linear"] == 4.5  # Q4_0: 18 bytes per 32 weights
    assert bits["bpw_embedding"] == bits["bpw_head"] == 32.0
    assert bits["types_linear"] == {"Q4_0": 14}
    assert bits["bpw_file"] == 8 * path.stat().st_size / 1000
    assert bits["data_bytes"] < bits["file_bytes"]  # the header and the vocabulary come on top


def test_readback_of_a_float_file_is_the_model(bench, shipped_tok, tmp_path):
    readback, _ = bench
    model = tiny_llada(len(shipped_tok), shipped_tok.mask_token_id)
    model.save_pretrained(tmp_path / "f")
    path = write_gguf(model, shipped_tok, tmp_path / "f.gguf")  # float tensors go in as F32
    back = readback.gguf_readback(path, tmp_path / "f").state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(back[name], value), name  # q / k rows put back in transformers' order
    n = sum(v.numel() for v in model.state_dict().values())
    bits = readback.file_bits(path, n)
    assert bits["bpw_data"] == 32.0 and bits["bpw_linear"] == 32.0 and bits["bpw_other"] == 32.0


def test_dequantized_takes_any_type_gguf_knows(bench):
    readback, _ = bench

    class Tensor:  # what dequantized reads of a gguf.ReaderTensor
        def __init__(self, data, qtype):
            self.data, self.tensor_type = data, qtype

    w = torch.randn(4, 64).numpy()
    q8 = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)
    out = readback.dequantized(Tensor(q8, gguf.GGMLQuantizationType.Q8_0))
    assert out.dtype == torch.float32 and out.shape == (4, 64)
    assert (out - torch.from_numpy(w)).abs().max() <= torch.from_numpy(w).abs().max() / 127
    assert torch.equal(readback.dequantized(Tensor(w, gguf.GGMLQuantizationType.F32)), torch.from_numpy(w))


@pytest.mark.parametrize("name,group", [("token_embd.weight", "embedding"), ("output.weight", "head"),
                                        ("blk.3.ffn_down.weight", "linear"), ("blk.0.attn_norm.weight", "other"),
                                        ("output_norm.weight", "other")])
def test_tensor_groups(bench, name, group):
    readback, _ = bench
    assert readback.tensor_group(name) == group


def test_calibration_text_gives_the_calibration_windows(bench, shipped_tok):
    _, script = bench
    ids, text = script.calibration_text(shipped_tok, "lee", num_samples=4, seq_len=32, seed=0)
    assert ids.shape == (4, 32)
    assert text == "\n".join(shipped_tok.decode(w, skip_special_tokens=False) for w in ids)
    again = shipped_tok(text, add_special_tokens=False).input_ids  # what llama-imatrix tokenizes, about
    assert ids.numel() <= len(again) <= ids.numel() + 8  # the windows' tokens, plus the newlines between them


def test_reference_is_the_same_type_with_imatrix_and_matching_embedding(bench):
    _, script = bench
    rows = [{"file": "lq-Q4_0", "type": "Q4_0", "source": "llama-quantize", "imatrix": False, "float_ends": False},
            {"file": "lq-Q4_0-imat", "type": "Q4_0", "source": "llama-quantize", "imatrix": True, "float_ends": False},
            {"file": "lq-Q4_0-imat-f32", "type": "Q4_0", "source": "llama-quantize", "imatrix": True,
             "float_ends": True},
            {"file": "ours-Q4_0", "type": "Q4_0", "source": "optimum-fair", "imatrix": False, "float_ends": True},
            {"file": "ours-Q4_0-mix", "type": "Q4_0", "source": "optimum-fair", "imatrix": False,
             "float_ends": False}]
    assert script.reference_of(rows[3], rows)["file"] == "lq-Q4_0-imat-f32"
    assert script.reference_of(rows[4], rows)["file"] == "lq-Q4_0-imat"
    assert script.reference_of(rows[0], rows)["file"] == "lq-Q4_0-imat"
    assert script.reference_of(rows[1], rows) is None  # the reference itself


def test_median_time_parses_the_diffusion_cli_log(bench):
    _, script = bench
    log = "step 64/64\ntotal time: 123.45ms, time per step: 1.93ms, sampling time per step: 0.10ms\n\nThe city"
    assert script.reported_ms(log) == pytest.approx(123.45)
    assert script.reported_ms("cut off mid-progress") is None


def _row(file, source, imatrix, flips, nll, bpw=4.5, float_ends=True):
    """A scored row: 8 prompts per text, 64 decisions per prompt, `flips` flips on each prompt."""
    row = {"file": file, "type": "Q4_0", "source": source, "imatrix": imatrix, "float_ends": float_ends,
           "bpw_file": bpw, "flip_rate": flips / 64}
    for text in ("wiki-val", "lee"):
        row.update({f"{text}/flips_per_prompt": [flips + (i % 3) for i in range(8)],
                    f"{text}/confident_flips_per_prompt": [flips // 2] * 8, f"{text}/confident_per_prompt": [32] * 8,
                    f"{text}/decisions": 8 * 64, f"{text}/nll": nll})
    return row


def test_targets_compare_ours_with_the_better_llama_file(bench):
    _, script = bench
    rows = [_row("lq", "llama-quantize", False, 12, 3.50), _row("lq-imat", "llama-quantize", True, 10, 3.45),
            _row("lq-imat-mix", "llama-quantize", True, 2, 3.40, bpw=4.7, float_ends=False),
            _row("ours", "optimum-fair", False, 7, 3.44, bpw=4.52)]
    (t,) = script.targets(rows)
    assert t["better_llama"] == "lq-imat"  # the lower flip rate among the same storage of embedding / head
    assert t["flip_ratio"] == pytest.approx(0.7)
    assert t["flip_rate_diff"] == pytest.approx(-3 / 64)
    assert t["flip_rate_ci"][1] < 0  # every prompt has 3 flips fewer
    assert t["nll_diff"]["lee"] == pytest.approx(-0.01)
    assert t["met"]
    rows[3]["bpw_file"] = 4.7  # 4.4 % larger: not the same size
    assert not script.targets(rows)[0]["met"]
