"""Where `export` writes (issue 32, S1 and W7-W12): only the output it names, never the input folder, the
current folder or a folder holding them; a refusal writes nothing. Plus the tokenizer cases (S2, W10, W11)
and one warning line per export (W13, N2)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import gguf
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerFast

import optimum_fair
from optimum_fair import FairCalibConfig, quantize
from optimum_fair.cli import main
from optimum_fair.export import export, save_quantized
from tests import hub_server
from tests.conftest import tiny_llada, tiny_lladamoe

hub = hub_server.hub  # the loopback Hub fixture

W4A16 = dict(rounding="rtn", transform="none", weighting="uniform", w_bits=4, a_bits=16)
REFUSED = (ValueError, FileExistsError, IsADirectoryError, NotADirectoryError)


@pytest.fixture(scope="module")
def bpe():
    return AutoTokenizer.from_pretrained(optimum_fair.DEFAULT_MODEL)  # byte-level BPE, 764 merges


@pytest.fixture(scope="module")
def saved(bpe, tmp_path_factory):
    """A tiny W4A16 LLaDA (fp16 scales: an exact GGUF) saved once: (folder, model)."""
    model = quantize(tiny_llada(len(bpe), bpe.mask_token_id).half(), FairCalibConfig(**W4A16), tokenizer=bpe)
    folder = tmp_path_factory.mktemp("saved") / "model"
    save_quantized(model, folder)  # the folder with its tokenizer (GGUF needs it)
    return folder, model


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under root (symlinks not followed): its kind and content digest or link target."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                out[rel] = "link:" + os.readlink(path)
            elif path.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _sandbox(source: Path) -> Path:  # under source's own temporary folder, nothing else writes there
    """root/{model (the input), cwd, other/important.txt, afile, empty/, links to the model and a file}."""
    top = Path(tempfile.mkdtemp(prefix="sandbox-", dir=source.parent))
    root = top / "a" / "b" / "c" / "root"  # five '..' from root/cwd stay inside top
    shutil.copytree(source, root / "model")
    for folder in ("cwd", "other", "empty"):
        (root / folder).mkdir()
    (root / "other" / "important.txt").write_text("precious")
    (root / "cwd" / "notes.txt").write_text("mine")
    (root / "afile").write_text("a file")
    os.symlink(root / "model", root / "link_to_model")
    os.symlink(root / "other" / "important.txt", root / "link_to_file")
    return root


BASES = ["", ".", "..", "model", "model/sub", "other", "empty", "afile", "link_to_model", "link_to_file", "new",
         "cwd", "cwd/deeper"]
STEPS = ["..", ".", "new", "x.gguf", "sub", "model", "link_to_model", ""]


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(base=st.sampled_from(BASES), steps=st.lists(st.sampled_from(STEPS), max_size=3),
       form=st.sampled_from(["absolute", "from root", "from cwd"]), fmt=st.sampled_from(["gguf", "compressed-tensors"]),
       overwrite=st.booleans(), from_folder=st.booleans())
def test_export_writes_only_its_output(saved, base, steps, form, fmt, overwrite, from_folder):
    """Any mix of '..', '.', '', the input folder, its ancestors and descendants, the cwd, symlinks and
    existing files: nothing outside the new output changes, and a refusal writes nothing."""
    root = _sandbox(saved[0])  # the cwd is root/cwd
    parts = [p for p in [base, *steps] if p]
    if not parts:
        out = ""
    elif form == "absolute":
        out = os.path.join(root, *parts)
    else:
        out = os.path.join(*([".."] if form == "from root" else []), *parts)
    top = root.parents[3]
    before, outside_before = snapshot(top), sorted(os.listdir(top.parent))
    cwd = os.getcwd()
    os.chdir(root / "cwd")
    try:
        source = root / "model" if from_folder else AutoModel.from_pretrained(root / "model")
        try:
            written = export(source, out, fmt, overwrite=overwrite)
        except REFUSED:
            written = None
    finally:
        os.chdir(cwd)
    after = snapshot(top)
    assert sorted(os.listdir(top.parent)) == outside_before  # nothing beside the sandbox either
    if written is None:
        assert after == before, f"refused {out!r} but the files changed"
    else:
        rel = written.relative_to(top).as_posix()
        assert rel != "a/b/c/root/model", out  # never the input itself
        changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
        new_parents = {p for p in changed if after.get(p) == "dir" and p not in before and rel.startswith(p + "/")}
        assert {k for k in changed if k != rel and not k.startswith(rel + "/")} <= new_parents, (out, changed)
        assert (after[rel] != "dir") == (fmt == "gguf")
        assert before.get(rel) is None or overwrite  # an existing entry replaced only with overwrite
    shutil.rmtree(top)


def test_issue_paths_are_refused_and_nothing_is_lost(saved, tmp_path, monkeypatch):
    """The issue's reproductions: DIR/new/.. with DIR the input or its parent, "" and "." from the cwd."""
    root = _sandbox(saved[0])
    before = snapshot(root)
    monkeypatch.chdir(root / "cwd")
    for fmt in ("gguf", "compressed-tensors"):
        for out, overwrite, says in [(root / "model" / "new" / "..", False, "is .*model"),
                                     (root / "new" / "..", True, "holds "),
                                     (root / "model", True, "is .*model"), ("", True, "path is empty"),
                                     (".", True, "is the current folder"), ("..", True, "holds the current folder"),
                                     ("/", True, "holds the current folder")]:
            with pytest.raises(ValueError, match=says):
                export(root / "model", out, fmt, overwrite=overwrite)
    assert snapshot(root) == before
    assert not (root / "model" / "new").exists() and not (root / "new").exists()
    shutil.rmtree(root.parents[3])


def test_overwrite_replaces_only_an_earlier_export_and_only_when_asked(saved, tmp_path):
    folder, model = saved
    out = export(model, tmp_path / "ct", "compressed-tensors")
    with pytest.raises(FileExistsError, match="exists; pass overwrite=True"):
        export(model, tmp_path / "ct", "compressed-tensors")
    (tmp_path / "ct" / "marker").write_text("old export")
    assert export(model, tmp_path / "ct", "compressed-tensors", overwrite=True) == out
    assert not (out / "marker").exists() and (out / "config.json").is_file()
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "important.txt").write_text("precious")  # not an export: never replaced
    with pytest.raises(FileExistsError, match="not a compressed-tensors export"):
        export(model, tmp_path / "results", "compressed-tensors", overwrite=True)
    assert (tmp_path / "results" / "important.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct", "results"]  # no temporary folder left


def test_gguf_into_a_folder_and_under_a_file_say_what_was_expected(saved, tmp_path):
    """W7: --output an existing folder; W9: a parent that is a file. W8: output == input with overwrite."""
    folder, model = saved
    (tmp_path / "somedir").mkdir()
    with pytest.raises(IsADirectoryError, match="somedir is a folder: a GGUF export is one file"):
        export(model, tmp_path / "somedir", "gguf", overwrite=True)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(NotADirectoryError, match="afile is a file, a folder was expected"):
        export(model, tmp_path / "afile" / "out.gguf", "gguf")
    with pytest.raises(FileExistsError, match="afile is a file: a compressed-tensors export is a folder"):
        export(model, tmp_path / "afile", "compressed-tensors", overwrite=True)
    before = snapshot(folder)
    with pytest.raises(ValueError, match="is .*model; writing there would replace it"):
        export(folder, folder, "compressed-tensors", overwrite=True)
    assert snapshot(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "somedir"]


def test_cli_export_refuses_the_input_folder(saved, capsys):
    folder, _ = saved
    before = snapshot(folder)
    assert main(["export", str(folder), "--format", "compressed-tensors", "--output", str(folder / "new" / "..")]) == 1
    assert "writing there would replace it" in capsys.readouterr().err
    assert snapshot(folder) == before


def test_a_failed_export_removes_the_folders_it_created(saved, tmp_path, monkeypatch):
    _, model = saved

    def broken(*args):
        raise RuntimeError("disk full")

    monkeypatch.setattr(optimum_fair.export.gguf_file, "write_gguf", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        export(model, tmp_path / "a" / "b" / "m.gguf", "gguf")
    assert list(tmp_path.iterdir()) == []


def _mem_tokenizer(bpe) -> PreTrainedTokenizerFast:
    """The shipped tokenizer rebuilt in memory: no folder (name_or_path '')."""
    return PreTrainedTokenizerFast(tokenizer_object=bpe.backend_tokenizer, bos_token="<|bos|>",
                                   eos_token=bpe.eos_token, pad_token=bpe.pad_token, mask_token=bpe.mask_token)


def test_gguf_vocab_comes_from_the_tokenizer_not_a_folder(saved, bpe, tmp_path, monkeypatch):
    """S2: an in-memory tokenizer (name_or_path ''), run from a folder holding another config.json."""
    _, model = saved
    mem = _mem_tokenizer(bpe)
    assert mem.name_or_path == ""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 777, "eos_token_id": 778, "pad_token_id": 779}))
    fields = gguf.GGUFReader(str(export(model, tmp_path / "mem.gguf", "gguf", tokenizer=mem))).fields
    merges = fields["tokenizer.ggml.merges"].contents()
    assert len(merges) == 764 and merges[0] == "Ġ t"
    assert fields["tokenizer.ggml.bos_token_id"].contents() == mem.bos_token_id
    assert fields["tokenizer.ggml.eos_token_id"].contents() == bpe.eos_token_id == 2
    assert fields["tokenizer.ggml.padding_token_id"].contents() == bpe.pad_token_id == 0
    assert fields["tokenizer.ggml.mask_token_id"].contents() == 3


def test_gguf_refuses_a_bpe_tokenizer_without_merges(saved, bpe, tmp_path):
    from tokenizers import Tokenizer, models

    _, model = saved
    empty = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(bpe.get_vocab(), [])),
                                    mask_token=bpe.mask_token)
    with pytest.raises(ValueError, match="has no BPE merges"):
        export(model, tmp_path / "m.gguf", "gguf", tokenizer=empty)
    assert list(tmp_path.iterdir()) == []


def test_gguf_of_a_model_loaded_by_hub_id_keeps_its_merges(hub, saved, tmp_path):
    """S2: a model and tokenizer loaded by Hub id have no local folder (loopback Hub)."""
    from optimum_fair.export import push_quantized

    folder, _ = saved
    push_quantized(folder, "tester/tiny-w4a16")
    model = AutoModel.from_pretrained("tester/tiny-w4a16", cache_dir=tmp_path / "cache")
    assert model.name_or_path == "tester/tiny-w4a16"
    fields = gguf.GGUFReader(str(export(model, tmp_path / "hub.gguf", "gguf"))).fields
    assert len(fields["tokenizer.ggml.merges"].contents()) == 764
    assert fields["general.name"].contents() == "tester/tiny-w4a16"


def test_a_folder_without_tokenizer_files(saved, tmp_path, caplog):
    """W10: GGUF needs the tokenizer and says so; compressed-tensors is written without one."""
    folder, _ = saved
    notok = tmp_path / "notok"
    shutil.copytree(folder, notok, ignore=shutil.ignore_patterns("tokenizer*"))
    with pytest.raises(ValueError, match="GGUF export needs the tokenizer: none given, and .*notok has no"):
        export(notok, tmp_path / "n.gguf", "gguf")
    with caplog.at_level(logging.WARNING):
        out = export(notok, tmp_path / "n-ct", "compressed-tensors")
    assert (out / "config.json").is_file() and not (out / "tokenizer.json").exists()
    assert "without a tokenizer" in caplog.text


def test_an_in_memory_model_quantized_without_a_tokenizer(tmp_path):
    """W11: name_or_path '' and no calibration tokenizer: compressed-tensors works, GGUF names what is missing."""
    model = quantize(tiny_llada(1024, 3), FairCalibConfig(**W4A16))
    assert (export(model, tmp_path / "nt-ct", "compressed-tensors") / "config.json").is_file()
    with pytest.raises(ValueError, match="GGUF export needs the tokenizer.*pass tokenizer="):
        export(model, tmp_path / "nt.gguf", "gguf")


def test_an_moe_export_logs_one_rounding_line(bpe, tmp_path, caplog):
    """W13 / N2: float32 scales of many experts: one summary warning for the whole export."""
    model = tiny_lladamoe(len(bpe), bpe.mask_token_id, moe_layer_freq=[1, 1, 1], shared_expert_intermediate_size=None,
                          expert_intermediate_size=64)
    quantize(model, FairCalibConfig(**W4A16, group_size=32), tokenizer=bpe)
    with caplog.at_level(logging.WARNING):
        export(model, tmp_path / "moe.gguf", "gguf", tokenizer=bpe)
    rounded = [r.getMessage() for r in caplog.records if "GGUF's fp16" in r.getMessage()]
    assert len(rounded) == 1 and "float32 scales" in rounded[0], rounded


def test_fp16_scales_export_without_a_warning(saved, tmp_path, caplog):
    _, model = saved
    with caplog.at_level(logging.WARNING):
        export(model, tmp_path / "m.gguf", "gguf")
    assert "GGUF's fp16" not in caplog.text
    assert torch.float16 == next(m.weight_scale.dtype for m in model.modules() if hasattr(m, "weight_scale"))
