"""llama.cpp itself reads the GGUF export: one non-causal forward through its C API (the ctypes bindings
of llama-cpp-python, over the libraries `scripts/build_llama_cpp.py` builds) against our model on the same
weights, and a 32-token decode with `llama-diffusion-cli`. Slow: the first run builds llama.cpp
(~30 minutes on one core); later runs reuse the build folder (OPTIMUM_FAIR_LLAMA_CPP)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

import optimum_fair
from optimum_fair import FairCalibConfig, reference_kernels
from optimum_fair.eval.generation import generate
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


@pytest.fixture(scope="module")
def llama_cpp():
    return build(default_cache(), jobs=os.cpu_count() or 1)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    config = FairCalibConfig(w_bits=4, a_bits=16, rounding="rtn", transform="none", weighting="uniform",
                             num_probes=8, num_samples=8)
    folder = tmp_path_factory.mktemp("llama_cpp") / "w4a16"
    AutoModel.from_pretrained(optimum_fair.DEFAULT_MODEL, quantization_config=config).save_pretrained(folder)
    return folder, export(folder, folder.parent / "w4a16.gguf", "gguf")


def test_llama_cpp_forward_matches_ours_on_the_same_weights(llama_cpp, exported, tmp_path):
    folder, gguf_path = exported
    tok = AutoTokenizer.from_pretrained(folder)
    text = tok("The history of the city begins with", add_special_tokens=False).input_ids
    ids = [tok.bos_token_id, *text] + [tok.mask_token_id] * 16  # a prompt and a masked answer
    env = dict(os.environ, PYTHONPATH=str(llama_cpp / "python"), LLAMA_CPP_LIB_PATH=str(llama_cpp / "bin"))
    subprocess.run([sys.executable, "-c", LLAMA_CPP_WORKER, str(gguf_path), str(tmp_path / "lc.npy"),
                    ",".join(map(str, ids))], check=True, env=env, capture_output=True, timeout=300)
    theirs = torch.from_numpy(np.load(tmp_path / "lc.npy"))
    ours_model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()  # the same codes, fp16 scales
    with torch.no_grad(), reference_kernels(ours_model):
        ours = ours_model(torch.tensor([ids])).logits[0]
    # llama.cpp multiplies Q4_0 weights with activations it rounds to Q8_0 (8-bit blocks of 32), so the
    # logits agree to that rounding, not bit for bit: within 3 % of the largest logit, same argmax mostly
    assert theirs.shape == ours.shape
    assert (theirs - ours).abs().max() <= 0.03 * ours.abs().max()
    assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean() >= 0.9


def test_llama_diffusion_cli_decodes_32_tokens_like_our_sampler(llama_cpp, exported):
    folder, gguf_path = exported
    done = subprocess.run([str(llama_cpp / "bin" / "llama-diffusion-cli"), "-m", str(gguf_path), "-p", "The city of",
                           "-n", "32", "--diffusion-steps", "32", "--diffusion-block-length", "32", "--temp", "0",
                           "-t", "1", "-c", "128", "-ub", "64", "-b", "64"],
                          capture_output=True, text=True, errors="replace", timeout=300,
                          env=dict(os.environ, LD_LIBRARY_PATH=str(llama_cpp / "bin")))
    assert done.returncode == 0, done.stderr[-2000:]
    theirs = done.stderr.rsplit("total time:", 1)[1].split("\n", 2)[2]  # the CLI logs the text after its timing
    model = AutoModel.from_pretrained(folder).eval()
    ours = generate(model, AutoTokenizer.from_pretrained(folder), "The city of", gen_length=32, block_length=32)
    assert len(theirs.split()) >= 5
    assert theirs.split()[0] == ours.split()[0]  # greedy, confidence-ordered: the same first word
