"""save_quantized / push_quantized / push_model / FairCalibConfig(push_to_hub=...) and transformers' own
model.save_pretrained / model.push_to_hub against the loopback Hub."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoTokenizer, PreTrainedModel

from optimum_fair import FairCalibConfig, calibration_result, quantize
from optimum_fair.export import HubPushError, push_model, push_quantized, save_quantized
from optimum_fair.export.card import build_card, hub_base_model, quant_tag
from optimum_fair.integrations.checkpoint import PRIOR_KEY, PRIOR_PREFIX
from tests import hub_server
from tests.conftest import char_tokenizer, tiny_llada

hub = hub_server.hub  # the loopback Hub fixture
SMALL = dict(num_probes=8, num_samples=8, seq_len=32, window=16, block_length=8, batch_size=4, epochs=2,
             dataset="lee", rounding="gptq", transform="hadamard")
X = torch.randint(4, 90, (2, 32), generator=torch.Generator().manual_seed(3))
METRICS = {"FP": {"nll": 4.19, "flip_rate": 0.0, "agreement": 1.0},
           "W4A4": {"nll": 4.35, "flip_rate": 0.329, "agreement": 0.61}}


def _logits(model):
    with torch.no_grad():
        return model(X).logits


def _digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _prior(model):
    return calibration_result(model).prior


def _same_prior(a, b) -> bool:
    return (torch.equal(a.weights, b.weights) and torch.equal(a.commit_step, b.commit_step)
            and torch.equal(a.reliability_sum, b.reliability_sum)
            and (a.window, a.floor, a.settings) == (b.window, b.floor, b.settings))


def _old_layout(model, folder: Path) -> Path:
    """A checkpoint as versions before the prior went into the weights wrote it: safetensors without the
    ``fair_prior.`` tensors and metadata entry, and the prior in ``prior/`` beside them."""
    model.save_pretrained(folder)
    file = folder / "model.safetensors"
    with safe_open(str(file), framework="pt") as f:
        metadata = {k: v for k, v in f.metadata().items() if k != PRIOR_KEY}
    tensors = {k: v for k, v in load_file(str(file)).items() if not k.startswith(PRIOR_PREFIX)}
    save_file(tensors, str(file), metadata=metadata)
    _prior(model).save(folder / "prior")
    return folder


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def qmodel(tok):
    return quantize(tiny_llada(len(tok), tok.mask_token_id), FairCalibConfig(**SMALL), tokenizer=tok)


@pytest.fixture(scope="module")
def saved(qmodel, tok, tmp_path_factory):
    out = tmp_path_factory.mktemp("saved") / "llada-w4a4"
    save_quantized(qmodel, out, tok, METRICS, base_model="GSAI-ML/LLaDA-8B-Instruct")
    return out


def test_folder_is_complete_and_card_has_metadata(saved):
    names = {p.relative_to(saved).as_posix() for p in saved.rglob("*") if p.is_file()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", "prior/prior.safetensors",
            "prior/prior.json"} <= names
    assert not [p for p in saved.parent.iterdir() if ".partial-" in p.name]
    card = ModelCard.load(saved / "README.md")
    assert card.data.base_model == "GSAI-ML/LLaDA-8B-Instruct"
    assert card.data.base_model_relation == "quantized"
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert card.data.tags == ["fair-calib", "w4a4", "diffusion-lm", "llada", "optimum-fair"]
    assert "| w_bits | 4 |" in card.text and "| transform | hadamard |" in card.text
    assert "| flip_rate | 0 | 0.329 |" in card.text  # FP vs quantized
    assert "| block | loss_rtn | loss |" in card.text and "\n| 1 | " in card.text
    assert 'AutoModel.from_pretrained("<this-repo-id>")' in card.text
    # fair weighting: the card says the prior's gain is not established, with the confirmatory numbers
    assert "**not established**" in card.text and "| prior, beta = 1 - uniform | -0.24 [" in card.text


def test_save_refuses_a_non_empty_folder_and_bad_models(saved, tmp_path, qmodel, tok):
    before = _digest(saved)
    with pytest.raises(FileExistsError, match="not empty"):
        save_quantized(qmodel, saved, tok)
    assert _digest(saved) == before
    with pytest.raises(ValueError, match="not quantized"):
        save_quantized(tiny_llada(len(tok), tok.mask_token_id), tmp_path / "fp")
    assert not (tmp_path / "fp").exists()


def test_interrupted_save_leaves_nothing_that_looks_complete(qmodel, tmp_path):
    class Broken:
        def save_pretrained(self, path):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_quantized(qmodel, tmp_path / "out", Broken())
    assert list(tmp_path.iterdir()) == []


def test_tags_and_base_model_id(tmp_path):
    assert quant_tag(FairCalibConfig(w_bits=4, a_bits=16)) == "w4a16"
    assert quant_tag(FairCalibConfig(w_bits=8, a_bits=8)) == "w8a8"

    class M:
        config = None

    m = M()
    m.name_or_path = "org/model"
    assert hub_base_model(m) == "org/model"
    m.name_or_path = str(tmp_path)
    assert hub_base_model(m) is None
    assert hub_base_model(m, "GSAI-ML/LLaDA-8B-Base") == "GSAI-ML/LLaDA-8B-Base"
    with pytest.raises(ValueError, match="repo id"):
        hub_base_model(m, "/local/path")


def test_push_then_reload_by_repo_id(hub, saved, qmodel, tmp_path):
    url = push_quantized(saved, "tester/llada-w4a4")
    assert url.startswith(hub.endpoint) and "/commit/" in url
    remote = hub.files("tester/llada-w4a4")
    assert remote["model.safetensors"] == (saved / "model.safetensors").read_bytes()
    assert b'from_pretrained("tester/llada-w4a4")' in remote["README.md"]
    assert "prior/prior.json" in remote
    reloaded = AutoModel.from_pretrained("tester/llada-w4a4", cache_dir=tmp_path / "cache")
    assert torch.equal(_logits(reloaded), _logits(qmodel))
    assert calibration_result(reloaded).reloaded and calibration_result(reloaded).blocks == []  # no recalibration
    assert _same_prior(_prior(reloaded), _prior(qmodel))  # the downloaded weights carry the prior
    tok = AutoTokenizer.from_pretrained("tester/llada-w4a4", cache_dir=tmp_path / "cache")
    assert tok.mask_token_id == 3
    save_quantized(reloaded, tmp_path / "copy")  # the tokenizer comes from the repo the model came from
    assert (tmp_path / "copy" / "tokenizer.json").read_bytes() == remote["tokenizer.json"]
    assert ModelCard.load(tmp_path / "copy" / "README.md").data.base_model is None  # not "tester/llada-w4a4"
    assert hub.unhandled == []


def test_existing_repo_needs_overwrite(hub, saved):
    push_quantized(saved, "tester/m")
    hub.repos["tester/m"].add_commit({**hub.files("tester/m"), "stale.bin": b"old"}, "someone else")
    commits = len(hub.repos["tester/m"].commits)
    with pytest.raises(HubPushError, match="already has files"):
        push_quantized(saved, "tester/m")
    assert len(hub.repos["tester/m"].commits) == commits
    push_quantized(saved, "tester/m", overwrite=True)
    assert "stale.bin" not in hub.files("tester/m")


def test_missing_or_wrong_token(hub, saved, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(ValueError, match="no Hugging Face token"):
        push_quantized(saved, "tester/m")
    assert hub.requests == []  # refused before any request
    with pytest.raises(HubPushError, match="401"):
        push_quantized(saved, "tester/m", token="hf_wrong")
    assert "tester/m" not in hub.repos


def test_server_error_mid_upload_then_retry(hub, saved):
    before = _digest(saved)
    hub.fail_next("commit")
    with pytest.raises(HubPushError, match="HTTP 500.*rerun to retry"):
        push_quantized(saved, "tester/flaky")
    assert _digest(saved) == before
    assert set(hub.files("tester/flaky")) == {".gitattributes"}  # nothing half-committed
    push_quantized(saved, "tester/flaky")  # the repo holds only .gitattributes: no overwrite needed
    assert hub.files("tester/flaky")["model.safetensors"] == (saved / "model.safetensors").read_bytes()


def test_bad_folder_and_repo_id_fail_before_requests(hub, tmp_path, saved):
    with pytest.raises(FileNotFoundError, match="config.json"):
        push_quantized(tmp_path, "tester/m")
    with pytest.raises(ValueError, match="repo id"):
        push_quantized(saved, "not a repo id!")
    assert hub.requests == []


def test_push_model_uploads_card_and_prior(hub, qmodel, tmp_path):
    push_model(qmodel, "tester/direct")  # the tokenizer is the one the model was calibrated with
    remote = hub.files("tester/direct")
    assert {"prior/prior.safetensors", "tokenizer.json", "model.safetensors"} <= set(remote)
    card = ModelCard(remote["README.md"].decode())
    assert "fair-calib" in card.data.tags and b"tester/direct" in remote["README.md"]
    reloaded = AutoModel.from_pretrained("tester/direct", cache_dir=tmp_path / "cache")
    assert torch.equal(_logits(reloaded), _logits(qmodel))


def test_save_quantized_writes_prior_and_keeps_other_files(qmodel, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    save_quantized(qmodel, tmp_path, overwrite=True)
    assert (tmp_path / "prior" / "prior.json").is_file() and (tmp_path / "README.md").is_file()
    assert (tmp_path / "notes.txt").read_text() == "mine"
    reloaded = AutoModel.from_pretrained(tmp_path)
    assert torch.equal(_logits(reloaded), _logits(qmodel))
    # read back (from the weights; prior/ is the same prior, readable on its own)
    assert torch.equal(calibration_result(reloaded).prior.weights, calibration_result(qmodel).prior.weights)
    save_quantized(reloaded, tmp_path / "again")  # a reloaded model still writes the card and prior
    assert (tmp_path / "again" / "prior" / "prior.json").is_file()
    assert "fair-calib" in ModelCard.load(tmp_path / "again" / "README.md").data.tags


def test_save_quantized_refuses_a_folder_holding_another_model(qmodel, tok, tmp_path):
    """Saving over the FP teacher's folder (a classic slip) or another model is refused, naming it, the folder
    kept; overwrite=True does it; an earlier save of a FAIR-Calib model of this type is written over by
    transformers' own save_pretrained as usual. (transformers' save_pretrained itself refuses nothing: no hook
    of it sees the folder, docs/architecture.md.)"""
    fp_dir = tmp_path / "teacher"
    tiny_llada(len(tok), tok.mask_token_id).save_pretrained(fp_dir)
    before = _digest(fp_dir)
    with pytest.raises(FileExistsError, match="not a FAIR-Calib checkpoint.*overwrite=True"):
        save_quantized(qmodel, fp_dir)
    assert _digest(fp_dir) == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(FileExistsError, match="'llama' model, this one is 'llada'"):
        save_quantized(qmodel, tmp_path / "other")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(FileExistsError, match="not a JSON config"):
        save_quantized(qmodel, tmp_path / "broken")
    save_quantized(qmodel, fp_dir, overwrite=True)
    assert torch.equal(_logits(AutoModel.from_pretrained(fp_dir)), _logits(qmodel))
    qmodel.save_pretrained(fp_dir)  # now a FAIR-Calib llada folder: saved over without a flag


def test_config_push_to_hub_pushes_after_calibration(hub, tok, monkeypatch):
    model = tiny_llada(len(tok), tok.mask_token_id)
    quantize(model, FairCalibConfig(**SMALL, push_to_hub="tester/from-config"), tokenizer=tok)
    remote = hub.files("tester/from-config")
    assert {"model.safetensors", "prior/prior.json", "tokenizer.json", "README.md"} <= set(remote)
    monkeypatch.delenv("HF_TOKEN")
    calls = []
    fresh = tiny_llada(len(tok), tok.mask_token_id)
    fresh.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match="no Hugging Face token"):
        quantize(fresh, FairCalibConfig(**SMALL, push_to_hub="tester/x"), tokenizer=tok)
    assert calls == []  # refused before calibrating


def test_model_push_to_hub_never_deletes_files_it_did_not_write(hub, qmodel):
    qmodel.push_to_hub("tester/shared")
    hub.repos["tester/shared"].add_commit({**hub.files("tester/shared"), "notes.md": b"theirs"}, "someone else")
    qmodel.push_to_hub("tester/shared")  # a second push updates: transformers' semantics
    remote = hub.files("tester/shared")
    assert remote["notes.md"] == b"theirs" and "model.safetensors" in remote
    push_model(qmodel, "tester/shared")  # the explicit push updates the same way
    assert hub.files("tester/shared")["notes.md"] == b"theirs"


def test_published_files_name_no_local_path(hub, tok, tmp_path):
    fp_dir = tmp_path / "my-local-llada"
    tiny_llada(len(tok), tok.mask_token_id).save_pretrained(fp_dir)
    tok.save_pretrained(fp_dir)
    model = quantize(AutoModel.from_pretrained(fp_dir), FairCalibConfig(**SMALL))
    push_model(model, "tester/no-paths")
    remote = hub.files("tester/no-paths")
    texts = {name: data.decode(errors="replace") for name, data in remote.items()
             if name.endswith((".json", ".md"))}
    assert {"README.md", "config.json", "prior/prior.json"} <= set(texts)
    for name, text in texts.items():
        assert str(tmp_path) not in text and "/tmp/" not in text, name
    assert "my-local-llada" in texts["README.md"]  # the base is named by its folder name
    model.push_to_hub("tester/no-paths-own")  # transformers' own: its card, config and weights (with the prior)
    remote = hub.files("tester/no-paths-own")
    assert {"README.md", "config.json", "model.safetensors"} <= set(remote)
    for name, data in remote.items():  # the safetensors header (prior settings, digests) included
        assert str(tmp_path).encode() not in data and b"/tmp/" not in data, name


def _push_requests(hub, saved) -> int:
    """Requests of one push into a new repo (the first push of a process also makes one-off requests)."""
    push_quantized(saved, "tester/warm-up")
    before = len(hub.requests)
    push_quantized(saved, "tester/count")
    return len(hub.requests) - before


@pytest.fixture
def client_timeout():
    """A request timeout for huggingface_hub's client (it sets none: a Hub that stops answering would
    block a push forever), configured the way huggingface_hub documents, restored afterwards."""
    from huggingface_hub import set_client_factory
    from huggingface_hub.utils._http import default_client_factory

    def short_timeout():
        client = default_client_factory()
        client.timeout = 0.5  # seconds, below the loopback hub's hang of 2 s
        return client

    set_client_factory(short_timeout)
    yield 0.5
    set_client_factory(default_client_factory)


@pytest.mark.parametrize("mode", ["500", "reset", "timeout"])
def test_a_fault_at_every_request_of_a_push(hub, saved, mode, request):
    if mode == "timeout":
        request.getfixturevalue("client_timeout")
    n_requests = _push_requests(hub, saved)
    assert n_requests >= 3
    before, failed = _digest(saved), 0
    for n in range(1, n_requests + 1):
        repo = f"tester/fault-{mode}-{n}"
        hub.fail_nth(n, mode)
        try:
            push_quantized(saved, repo)
        except HubPushError as err:
            failed += 1
            assert repo in str(err) and "nothing local was changed" in str(err), str(err)
            assert mode != "timeout" or "Timeout" in str(err), str(err)  # says what failed
        assert not hub.fault_pending(), f"request {n}: the fault never fired"
        assert _digest(saved) == before, f"request {n}: the local folder changed"
        push_quantized(saved, repo, update=True)  # the retry succeeds
        assert hub.files(repo)["model.safetensors"] == (saved / "model.safetensors").read_bytes()
    assert failed >= 1  # at least one fault reached the caller as an error


@pytest.mark.parametrize("damage", ["json", "tensors"])
def test_a_damaged_prior_is_named_and_the_model_still_loads(qmodel, tmp_path, caplog, damage):
    """issue 32 W29: a broken prior/prior.json made from_pretrained fail with a bare JSONDecodeError naming no
    file, although inference does not use the prior. (A checkpoint of the older layout: prior/ beside the weights.)"""
    _old_layout(qmodel, tmp_path / "q")
    broken = tmp_path / "q" / "prior" / ("prior.json" if damage == "json" else "prior.safetensors")
    broken.write_text("{broken")
    with caplog.at_level("WARNING", logger="optimum_fair"):
        reloaded = AutoModel.from_pretrained(tmp_path / "q")
    assert torch.equal(_logits(reloaded), _logits(qmodel))
    assert f"{tmp_path / 'q' / 'prior'} cannot be read as the Stage I prior" in caplog.text
    assert "the model loads without it" in caplog.text
    assert calibration_result(reloaded).prior is None


def test_save_into_an_empty_folder_under_a_read_only_parent(qmodel, tmp_path):
    """issue 32 W4: the folder was assembled beside the target, so a writable folder under a read-only parent
    gave PermissionError on '.out.partial-...', where plain transformers saves."""
    import os
    import subprocess

    parent = tmp_path / "ro_parent"
    (parent / "out").mkdir(parents=True)
    # root writes into any folder whatever its mode, but not into an immutable one
    lock, unlock = ((["chattr", "+i", str(parent)], ["chattr", "-i", str(parent)]) if os.geteuid() == 0 else
                    (["chmod", "555", str(parent)], ["chmod", "755", str(parent)]))
    subprocess.run(lock, check=True)
    try:
        with pytest.raises(PermissionError):
            (parent / "probe").mkdir()  # the parent really refuses new entries
        save_quantized(qmodel, parent / "out")
        assert sorted(os.listdir(parent)) == ["out"]
    finally:
        subprocess.run(unlock, check=True)
    out = parent / "out"
    assert {"config.json", "model.safetensors", "README.md", "prior"} <= set(os.listdir(out))
    assert not [p for p in os.listdir(out) if p.startswith(".")]  # the temporary folder is gone
    assert torch.equal(_logits(AutoModel.from_pretrained(out)), _logits(qmodel))


def test_save_pretrained_and_push_to_hub_are_transformers_own(qmodel):
    assert "save_pretrained" not in vars(qmodel) and "push_to_hub" not in vars(qmodel)
    assert qmodel.save_pretrained.__func__ is PreTrainedModel.save_pretrained
    assert qmodel.push_to_hub.__func__ is PreTrainedModel.push_to_hub
    # the Hub tags travel as the model's own tags, the same list as the full card's
    assert qmodel.model_tags == build_card(qmodel).data.tags == ["fair-calib", "w4a4", "diffusion-lm", "llada",
                                                                   "optimum-fair"]


def test_save_pretrained_then_reload_keeps_the_prior_without_unexpected_keys(qmodel, tmp_path, caplog):
    qmodel.save_pretrained(tmp_path / "q")
    assert sorted(p.name for p in (tmp_path / "q").iterdir()) == ["config.json", "model.safetensors"]
    with safe_open(str(tmp_path / "q" / "model.safetensors"), framework="pt") as f:
        assert {PRIOR_PREFIX + "weights", PRIOR_PREFIX + "commit_step"} <= set(f.keys())
        assert json.loads(f.metadata()[PRIOR_KEY])["window"] == _prior(qmodel).window
    with caplog.at_level("WARNING"):
        reloaded, info = AutoModel.from_pretrained(tmp_path / "q", output_loading_info=True)
    assert info["unexpected_keys"] == set() and info["missing_keys"] == set()
    assert "fair_prior" not in caplog.text and "UNEXPECTED" not in caplog.text.upper()
    assert _same_prior(_prior(reloaded), _prior(qmodel))
    assert torch.equal(_logits(reloaded), _logits(qmodel))
    assert reloaded.model_tags == qmodel.model_tags
    reloaded.save_pretrained(tmp_path / "again")  # a reloaded model writes its prior again
    assert _same_prior(_prior(AutoModel.from_pretrained(tmp_path / "again")), _prior(qmodel))


def test_a_sharded_save_keeps_the_prior(qmodel, tmp_path):
    qmodel.save_pretrained(tmp_path / "q", max_shard_size="20KB")
    shards = sorted((tmp_path / "q").glob("model-*.safetensors"))
    assert len(shards) > 1
    for shard in shards:  # each shard records the prior's settings (transformers writes the metadata into each)
        with safe_open(str(shard), framework="pt") as f:
            assert PRIOR_KEY in f.metadata()
    assert _same_prior(_prior(AutoModel.from_pretrained(tmp_path / "q")), _prior(qmodel))


def test_transformers_push_to_hub_then_reload_keeps_the_prior(hub, qmodel, tmp_path):
    qmodel.push_to_hub("tester/own")
    remote = hub.files("tester/own")
    assert {"config.json", "model.safetensors", "README.md"} <= set(remote)
    assert not [name for name in remote if name.startswith("prior/")]  # the prior is inside the weights
    assert "fair-calib" in ModelCard(remote["README.md"].decode()).data.tags  # transformers' card, our tags
    reloaded = AutoModel.from_pretrained("tester/own", cache_dir=tmp_path / "cache")
    assert _same_prior(_prior(reloaded), _prior(qmodel))
    assert torch.equal(_logits(reloaded), _logits(qmodel))
    assert hub.unhandled == []


def test_a_checkpoint_with_a_prior_folder_still_loads_its_prior(qmodel, tmp_path):
    folder = _old_layout(qmodel, tmp_path / "old")
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        assert not [k for k in f.keys() if k.startswith(PRIOR_PREFIX)] and PRIOR_KEY not in f.metadata()
    reloaded = AutoModel.from_pretrained(folder)
    assert _same_prior(_prior(reloaded), _prior(qmodel))
    reloaded.save_pretrained(tmp_path / "new")  # a re-save moves it into the weights
    assert _same_prior(_prior(AutoModel.from_pretrained(tmp_path / "new")), _prior(qmodel))


def test_a_damaged_prior_in_the_weights_is_named_and_the_model_still_loads(qmodel, tmp_path, caplog):
    qmodel.save_pretrained(tmp_path / "q")
    file = tmp_path / "q" / "model.safetensors"
    with safe_open(str(file), framework="pt") as f:
        metadata = {**f.metadata(), PRIOR_KEY: "{broken"}
    save_file(load_file(str(file)), str(file), metadata=metadata)
    with caplog.at_level("WARNING", logger="optimum_fair"):
        reloaded = AutoModel.from_pretrained(tmp_path / "q")
    assert "fair_prior.* tensors of" in caplog.text and "the model loads without it" in caplog.text
    assert _prior(reloaded) is None
    assert torch.equal(_logits(reloaded), _logits(qmodel))
