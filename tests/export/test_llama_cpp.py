"""llama.cpp itself reads the GGUF export: one non-causal forward through its C API (the ctypes bindings
of llama-cpp-python, over the libraries `scripts/build_llama_cpp.py` builds) against our model on the same
weights (the shipped LLaDA, a tiny Dream and a tiny LLaDA-MoE), and a 32-token decode with
`llama-diffusion-cli`. Slow: the first run builds llama.cpp (~13 minutes on one core); later runs reuse
the build folder (OPTIMUM_FAIR_LLAMA_CPP)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

import optimum_fair
from optimum_fair import FairCalibConfig, reference_kernels, save_quantized
from optimum_fair.export import export
from scripts.build_llama_cpp import build, default_cache

pytestmark = pytest.mark.slow

LLAMA_CPP_WORKER = r"""
import sys, numpy as np, llama_cpp as L
path, out, ids = sys.argv[1], sys.argv[2], [int(t) for t in sys.argv[3].split(",")]
L.llama_backend_init()
model = L.llama_model_load_from_file(path.encode(), L.llama_model_default_params())
cp = L.llama_context_default_params()
cp.n_ctx = cp.n_batch = cp.n_ubatch = 128
cp.n_threads = cp.n_threads_batch = 1
ctx = L.llama_init_from_model(model, cp)
batch = L.llama_batch_init(len(ids), 0, 1)
for i, t in enumerate(ids):
    batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, i, 1, 1
    batch.seq_id[i][0] = 0
batch.n_tokens = len(ids)
assert L.llama_decode(ctx, batch) == 0
n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
np.save(out, np.ctypeslib.as_array(L.llama_get_logits(ctx), shape=(len(ids), n_vocab)).copy())
"""


def llama_cpp_logits(llama_cpp, gguf_path, ids: list[int], tmp_path) -> torch.Tensor:
    """llama.cpp's logits (len(ids), vocab) for one non-causal batch, from a subprocess on its C API."""
    env = dict(os.environ, PYTHONPATH=str(llama_cpp / "python"), LLAMA_CPP_LIB_PATH=str(llama_cpp / "bin"),
               LD_LIBRARY_PATH=str(llama_cpp / "bin"))
    subprocess.run([sys.executable, "-c", LLAMA_CPP_WORKER, str(gguf_path), str(tmp_path / "lc.npy"),
                    ",".join(map(str, ids))], check=True, env=env, capture_output=True, timeout=300)
    return torch.from_numpy(np.load(tmp_path / "lc.npy"))


@pytest.fixture(scope="module")
def llama_cpp():
    return build(default_cache(), jobs=os.cpu_count() or 1)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    config = FairCalibConfig(w_bits=4, a_bits=16, rounding="rtn", transform="none", weighting="uniform",
                             num_probes=8, num_samples=8)
    folder = tmp_path_factory.mktemp("llama_cpp") / "w4a16"
    save_quantized(AutoModel.from_pretrained(optimum_fair.DEFAULT_MODEL, quantization_config=config), folder)
    return folder, export(folder, folder.parent / "w4a16.gguf", "gguf")


def test_llama_cpp_forward_matches_ours_on_the_same_weights(llama_cpp, exported, tmp_path):
    folder, gguf_path = exported
    tok = AutoTokenizer.from_pretrained(folder)
    text = tok("The history of the city begins with", add_special_tokens=False).input_ids
    ids = [tok.bos_token_id, *text] + [tok.mask_token_id] * 16  # a prompt and a masked answer
    theirs = llama_cpp_logits(llama_cpp, gguf_path, ids, tmp_path)
    ours_model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()  # the same codes, fp16 scales
    with torch.no_grad(), reference_kernels(ours_model):
        ours = ours_model(torch.tensor([ids])).logits[0]
    # llama.cpp multiplies Q4_0 weights with activations it rounds to Q8_0 (8-bit blocks of 32), so the
    # logits agree to that rounding, not bit for bit: within 3 % of the largest logit, same argmax mostly
    assert theirs.shape == ours.shape
    assert (theirs - ours).abs().max() <= 0.03 * ours.abs().max()
    assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean() >= 0.9


def test_llama_cpp_runs_a_dream_export(llama_cpp, tmp_path):
    from tests.export.test_engines import _tiny_dream

    tok = AutoTokenizer.from_pretrained(optimum_fair.DEFAULT_MODEL)
    save_quantized(_tiny_dream(tok, torch.float16), tmp_path / "dream", tokenizer=tok)  # fp16 scales: exact GGUF
    gguf_path = export(tmp_path / "dream", tmp_path / "dream.gguf", "gguf")
    ids = [tok.bos_token_id, *tok("The city of", add_special_tokens=False).input_ids] + [tok.mask_token_id] * 8
    theirs = llama_cpp_logits(llama_cpp, gguf_path, ids, tmp_path)
    ours_model = AutoModel.from_pretrained(tmp_path / "dream", dtype=torch.float32).eval()
    with torch.no_grad(), reference_kernels(ours_model):
        ours = ours_model(torch.tensor([ids])).logits[0]
    assert (theirs - ours).abs().max() <= 0.03 * ours.abs().max()  # Q8_0 activation rounding, as above
    assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean() >= 0.9


def test_llama_cpp_runs_a_llada_moe_export(llama_cpp, tmp_path):
    # llama.cpp's llada-moe: experts stacked into 3-D Q4_0 tensors, routed by its own top-k
    from optimum_fair import quantize
    from tests.conftest import tiny_lladamoe

    tok = AutoTokenizer.from_pretrained(optimum_fair.DEFAULT_MODEL)
    model = tiny_lladamoe(len(tok), tok.mask_token_id, moe_layer_freq=[1, 1, 1],  # fp16 scales: an exact GGUF
                          shared_expert_intermediate_size=None, expert_intermediate_size=64).half()
    quantize(model, FairCalibConfig(rounding="rtn", transform="none", weighting="uniform", w_bits=4, a_bits=16,
                                    group_size=32), tokenizer=tok)
    model.save_pretrained(tmp_path / "moe")
    tok.save_pretrained(tmp_path / "moe")
    gguf_path = export(tmp_path / "moe", tmp_path / "moe.gguf", "gguf")
    ids = [tok.bos_token_id, *tok("The city of", add_special_tokens=False).input_ids] + [tok.mask_token_id] * 8
    theirs = llama_cpp_logits(llama_cpp, gguf_path, ids, tmp_path)
    ours_model = AutoModel.from_pretrained(tmp_path / "moe", dtype=torch.float32).eval()
    with torch.no_grad(), reference_kernels(ours_model):
        ours = ours_model(torch.tensor([ids])).logits[0]
    assert (theirs - ours).abs().max() <= 0.03 * ours.abs().max()  # Q8_0 activation rounding, as above
    assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean() >= 0.9


def _decoded_text(stderr: str) -> str:
    """The text llama-diffusion-cli logs (to stderr) two lines after its "total time:" line."""
    _, found, tail = stderr.rpartition("total time:")
    lines = tail.split("\n", 2)
    assert found and len(lines) == 3, f"no decoded text after a timing line in: {stderr[-3000:]!r}"
    return lines[2]


def test_llama_diffusion_cli_decodes_32_tokens(llama_cpp, exported):
    _, gguf_path = exported
    command = [str(llama_cpp / "bin" / "llama-diffusion-cli"), "-m", str(gguf_path), "-p", "The city of", "-n", "32",
               "--diffusion-steps", "32", "--diffusion-block-length", "32", "--temp", "0", "--seed", "0", "-t", "1",
               "-c", "128", "-ub", "64", "-b", "64"]
    texts = []
    for _ in range(2):  # seeded: the same text twice
        for _attempt in range(3):
            done = subprocess.run(command, capture_output=True, text=True, errors="replace", timeout=300,
                                  env=dict(os.environ, LD_LIBRARY_PATH=str(llama_cpp / "bin")))
            assert done.returncode == 0, done.stderr[-2000:]
            _, found, tail = done.stderr.rpartition("total time:")
            if found and len(tail.split("\n", 2)) == 3 and tail.split("\n", 2)[2].strip():
                break
            # llama.cpp logs from a worker thread and can exit before it flushes: about one run in ten
            # here ended its log mid-progress-bar (exit code 0). Only such a cut log is run again.
        texts.append(_decoded_text(done.stderr))
    assert texts[0] == texts[1]
    assert len(texts[0].split()) >= 5 and "<|mask|>" not in texts[0]  # every masked position was decided


def _with_gguf_ends(model, gguf_path):
    """`model` with its embedding and head replaced by what the GGUF file holds (gguf's dequantizer)."""
    import gguf

    tensors = {t.name: t for t in gguf.GGUFReader(str(gguf_path)).tensors}
    for name, module in (("token_embd.weight", model.get_input_embeddings()),
                         ("output.weight", model.get_output_embeddings())):
        t = tensors[name]
        data = gguf.quants.dequantize(t.data, t.tensor_type).reshape(module.weight.shape)
        module.weight.data = torch.from_numpy(np.array(data, dtype=np.float32))
    return model


@pytest.mark.parametrize("gguf_type", ["Q4_0", "F16"])
def test_llama_cpp_reads_the_mixes(llama_cpp, q4_0, gguf_type, tmp_path):
    # Q4_0: calibrated codes, embedding Q4_0 and head Q6_K from our own encoders; F16: the float teacher
    folder, _ = q4_0
    tok = AutoTokenizer.from_pretrained(folder)
    source = folder if gguf_type == "Q4_0" else AutoModel.from_pretrained(optimum_fair.DEFAULT_MODEL)
    gguf_path = export(source, tmp_path / f"{gguf_type}.gguf", "gguf", tokenizer=tok, gguf_type=gguf_type)
    ids = [tok.bos_token_id, *tok("The history of the city begins with", add_special_tokens=False).input_ids]
    ids += [tok.mask_token_id] * 16
    theirs = llama_cpp_logits(llama_cpp, gguf_path, ids, tmp_path)
    if gguf_type == "Q4_0":
        ours_model = _with_gguf_ends(AutoModel.from_pretrained(folder, dtype=torch.float32).eval(), gguf_path)
    else:
        ours_model = AutoModel.from_pretrained(optimum_fair.DEFAULT_MODEL, dtype=torch.float32).eval()
    with torch.no_grad(), reference_kernels(ours_model):
        ours = ours_model(torch.tensor([ids])).logits[0]
    assert (theirs - ours).abs().max() <= 0.03 * ours.abs().max()  # llama.cpp's own activation rounding
    assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean() >= 0.9


@pytest.mark.parametrize("gguf_type", ["Q4_K_M", "Q5_K_M", "IQ4_XS"])
def test_llama_cpp_reads_our_k_quant_mixes(llama_cpp, gguf_type, tmp_path):
    # every block linear in the type llama-quantize gives it (K-quants with mins, Q6_K, Q5_0 / Q5_1 / Q8_0)
    tok = AutoTokenizer.from_pretrained(optimum_fair.DEFAULT_MODEL)
    config = FairCalibConfig(gguf_type=gguf_type, rounding="rtn", weighting="uniform")
    model = AutoModel.from_pretrained(optimum_fair.DEFAULT_MODEL, dtype=torch.float32, quantization_config=config)
    gguf_path = export(model, tmp_path / f"{gguf_type}.gguf", "gguf", tokenizer=tok, gguf_type=gguf_type)
    ids = [tok.bos_token_id, *tok("The history of the city begins with", add_special_tokens=False).input_ids]
    ids += [tok.mask_token_id] * 16
    theirs = llama_cpp_logits(llama_cpp, gguf_path, ids, tmp_path)
    ours_model = _with_gguf_ends(model.eval(), gguf_path)
    with torch.no_grad(), reference_kernels(ours_model):
        ours = ours_model(torch.tensor([ids])).logits[0]
    assert (theirs - ours).abs().max() <= 0.03 * ours.abs().max()
    assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean() >= 0.9
