"""Published artifacts carry no local path, and machine-local settings stay local (issue 32: S5, W27).

A model whose teacher, tokenizer, prior and block cache all live under one distinctive folder is saved,
pushed (the loopback Hub) and exported in both formats; no written or uploaded byte names that folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import pytest
from transformers import AutoConfig, AutoModel, AutoTokenizer

import optimum_fair
from optimum_fair import FairCalibConfig
from optimum_fair.export import export, push_quantized, save_quantized
from tests import hub_server
from tests.conftest import tiny_llada

hub = hub_server.hub  # the loopback Hub fixture
SECRET = "home_alice_secret_7f3a"
SMALL = dict(num_probes=4, num_samples=4, seq_len=32, window=16, block_length=8, batch_size=2, dataset="lee",
             rounding="gptq", transform="none", w_bits=4, a_bits=16)


@pytest.fixture(scope="module")
def secret(tmp_path_factory) -> Path:
    """<tmp>/home_alice_secret_7f3a/{teacher, tokenizer, first (a run whose prior/ is reused)}."""
    folder = tmp_path_factory.mktemp("machine") / SECRET
    tok = AutoTokenizer.from_pretrained(optimum_fair.DEFAULT_MODEL)
    tok.save_pretrained(folder / "tokenizer")
    tiny_llada(len(tok), tok.mask_token_id).save_pretrained(folder / "teacher")
    first = AutoModel.from_pretrained(folder / "teacher", quantization_config=FairCalibConfig(
        **SMALL, tokenizer=str(folder / "tokenizer")))
    save_quantized(first, folder / "first")
    assert (folder / "first" / "prior" / "prior.json").is_file()
    return folder


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_saved_pushed_and_exported_files_name_no_local_folder(hub, secret, tmp_path):
    config = FairCalibConfig(**SMALL, tokenizer=str(secret / "tokenizer"), prior=str(secret / "first" / "prior"),
                             cache_dir=str(secret / "cache"))
    model = AutoModel.from_pretrained(secret / "teacher", quantization_config=config)
    assert (secret / "cache" / "manifest.json").is_file()  # the run used the local settings
    out = tmp_path / "published"
    save_quantized(model, out / "saved")
    model.push_to_hub("tester/secret-direct")  # transformers' own: its card, config, weights with the prior
    push_quantized(out / "saved", "tester/secret-folder")
    export(model, out / "mem.gguf", "gguf")
    export(out / "saved", out / "saved.gguf", "gguf")
    export(model, out / "mem-ct", "compressed-tensors")
    export(out / "saved", out / "saved-ct", "compressed-tensors")
    written = {**_files(out), **{f"hub:{name}": data for repo in ("tester/secret-direct", "tester/secret-folder")
                                 for name, data in hub.files(repo).items()}}
    assert {"saved/config.json", "saved/README.md", "saved/prior/prior.json", "mem.gguf", "saved-ct/config.json",
            "hub:README.md", "hub:config.json"} <= set(written)
    leaks = sorted(name for name, data in written.items() if SECRET.encode() in data or str(tmp_path).encode() in data)
    assert leaks == []
    quant = json.loads(written["saved/config.json"])["quantization_config"]
    assert quant["cache_dir"] is None and quant["prior"] is None and quant["tokenizer"] is None
    assert gguf.GGUFReader(str(out / "mem.gguf")).fields["general.name"].contents() == "teacher"  # the folder name
    assert gguf.GGUFReader(str(out / "saved.gguf")).fields["general.name"].contents() == "saved"


def test_a_published_config_never_writes_where_its_publisher_pointed(secret, tmp_path, monkeypatch):
    """W27: a config.json from an older version names a cache_dir and a prior; reusing it writes neither."""
    pub = tmp_path / "pub"
    pub.mkdir()
    AutoConfig.from_pretrained(secret / "first").save_pretrained(pub)
    config = json.loads((pub / "config.json").read_text())
    config["quantization_config"].update(cache_dir="../escaped_cache", prior="../their_prior")
    (pub / "config.json").write_text(json.dumps(config))
    teacher = tmp_path / "teacher"
    shutil.copytree(secret / "teacher", teacher)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(secret / "tokenizer" / name, teacher)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    reused = AutoConfig.from_pretrained(pub).quantization_config
    model = AutoModel.from_pretrained(teacher, quantization_config=reused)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pub", "teacher", "work"]  # no ../escaped_cache
    assert list(work.iterdir()) == []
    assert model.config.quantization_config.cache_dir is None
