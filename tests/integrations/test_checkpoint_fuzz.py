"""Fuzzed checkpoints: a saved tiny quantized model corrupted in many seeded ways either loads exactly the
saved model or raises an error naming the file and the tensor or field; never a model with other weights.

The cases: truncation at random offsets, bytes flipped in the safetensors header and in the tensor data,
a dropped, renamed, re-typed or re-shaped tensor, int4 codes of the wrong length, edited
`quantization_config` values (bad values, unknown keys, a future version) and a config.json that is not
JSON. `test_case_count` states how many there are.
"""

from __future__ import annotations

import json
import random
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel

from optimum_fair import FairCalibConfig, quantize
from optimum_fair.export import save_quantized
from tests.conftest import char_tokenizer, tiny_llada

X = torch.randint(4, 60, (2, 24), generator=torch.Generator().manual_seed(11))
WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tok = char_tokenizer()
    model = quantize(tiny_llada(len(tok), tok.mask_token_id),
                     FairCalibConfig(rounding="rtn", transform="none", w_bits=4, a_bits=4), tokenizer=tok)
    out = tmp_path_factory.mktemp("fuzz") / "saved"
    save_quantized(model, out, tok)
    with torch.no_grad():
        logits = AutoModel.from_pretrained(out)(X).logits
    return out, logits


def _header_len(path: Path) -> int:
    return 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]


def _edit_tensors(folder: Path, edit) -> None:
    state = load_file(str(folder / WEIGHTS))
    edit(state)
    save_file(state, str(folder / WEIGHTS), metadata={"format": "pt"})


def _edit_quant(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"].update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def _flip(folder: Path, lo: int, hi: int, rng: random.Random) -> str:
    raw = bytearray((folder / WEIGHTS).read_bytes())
    pos = rng.randrange(lo, min(hi, len(raw)))
    raw[pos] ^= 1 << rng.randrange(8)
    (folder / WEIGHTS).write_bytes(bytes(raw))
    return str(pos)


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return path.name


def _cases(folder: Path) -> list[tuple[str, object]]:
    """(name, corrupt(folder, rng) -> expected name in the error or None) for every case."""
    rng0 = random.Random(0)
    size, header = (folder / WEIGHTS).stat().st_size, _header_len(folder / WEIGHTS)
    state = load_file(str(folder / WEIGHTS))
    packed = sorted(k for k, v in state.items() if v.dtype == torch.uint8)
    floats = sorted(k for k, v in state.items() if v.is_floating_point())
    cases = []
    for cut in sorted(rng0.sample(range(1, size), 6)):
        cases.append((f"truncate@{cut}", lambda f, r, c=cut: _write(f / WEIGHTS, (f / WEIGHTS).read_bytes()[:c])))
    for i in range(6):
        cases.append((f"header-flip-{i}", lambda f, r: _flip(f, 8, header, r) and WEIGHTS))
    for i in range(6):
        cases.append((f"data-flip-{i}", lambda f, r: _flip(f, header, size, r) and WEIGHTS))
    for name in rng0.sample(packed, 2) + rng0.sample(floats, 2):
        cases.append((f"drop {name}", lambda f, r, n=name: _edit_tensors(f, lambda s: s.pop(n)) or n))
        cases.append((f"rename {name}", lambda f, r, n=name: _edit_tensors(f, lambda s: s.__setitem__(
            n + "_x", s.pop(n))) or n))
    for name in rng0.sample(packed, 2):
        cases.append((f"short codes {name}", lambda f, r, n=name: _edit_tensors(
            f, lambda s: s.__setitem__(n, s[n][:-1].clone())) or n))
        cases.append((f"codes as int8 {name}", lambda f, r, n=name: _edit_tensors(
            f, lambda s: s.__setitem__(n, s[n].view(torch.int8).clone())) or n))
    scale = next(k for k in floats if k.endswith("weight_scale"))
    cases.append((f"reshape {scale}", lambda f, r: _edit_tensors(
        f, lambda s: s.__setitem__(scale, s[scale].reshape(1, -1).clone())) or scale))
    for field, value in [("w_bits", 3), ("a_bits", "x"), ("group_size", 7), ("transform", "bogus"),
                         ("version", 99), ("w_bit", 4), ("rounding", None)]:
        cases.append((f"config {field}={value!r}", lambda f, r, k=field, v=value: _edit_quant(f, **{k: v}) or k))
    cases.append(("config.json not JSON", lambda f, r: _write(f / "config.json", b"{not json")))
    cases.append(("config.json truncated",
                  lambda f, r: _write(f / "config.json", (f / "config.json").read_bytes()[:40])))
    return cases


def test_case_count(saved):
    assert len(_cases(saved[0])) == 40


@pytest.mark.parametrize("index", range(40))
def test_corrupted_checkpoint_loads_exactly_or_names_the_problem(saved, tmp_path, index):
    source, reference = saved
    name, corrupt = _cases(source)[index]
    folder = tmp_path / "case"
    shutil.copytree(source, folder)
    expected = corrupt(folder, random.Random(index))
    try:
        model = AutoModel.from_pretrained(folder)
    except Exception as err:  # what the user sees: the error must say what is wrong and where
        text = f"{type(err).__name__}: {err}"
        assert isinstance(err, (ValueError, OSError, NotImplementedError)), f"{name}: {text}"
        assert expected in text, f"{name}: the error does not name {expected!r}: {text}"
        return
    with torch.no_grad():
        assert torch.equal(model(X).logits, reference), f"{name}: loaded a model with other weights"


def test_edited_activation_bits_are_refused(saved, tmp_path):
    """a_bits shows in no tensor shape: the checkpoint records it, and an edited config.json is refused."""
    folder = tmp_path / "edited"
    shutil.copytree(saved[0], folder)
    _edit_quant(folder, a_bits=8)  # a valid value, just not the one the layers were calibrated for
    with pytest.raises(ValueError, match=r"model\.safetensors: its layers were saved with a_bits=4, but "
                                         r"config\.json says a_bits=8"):
        AutoModel.from_pretrained(folder)


@pytest.mark.parametrize("bad", [float("nan"), 0.0, -1.0, float("inf")])
def test_scales_that_are_not_finite_and_positive_are_refused(saved, tmp_path, bad):
    folder = tmp_path / "scales"
    shutil.copytree(saved[0], folder)

    def poison(state):  # written without digests, as a checkpoint from before them would be
        key = next(k for k in state if k.endswith("q_proj.weight_scale"))
        state[key][0, 0] = bad

    _edit_tensors(folder, poison)
    with pytest.raises(ValueError, match=r"q_proj\.weight_scale: scales must be finite and positive"):
        AutoModel.from_pretrained(folder)
