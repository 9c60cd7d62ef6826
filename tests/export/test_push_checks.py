"""What a push checks before its first request, and what its errors name (issue 32: W5, W23-W25, N11)."""

from __future__ import annotations

import logging
import os
import shutil

import pytest

from optimum_fair import FairCalibConfig, quantize
from optimum_fair.cli import main
from optimum_fair.export import HubPushError, push_model, push_quantized, save_quantized
from tests import hub_server
from tests.conftest import char_tokenizer, tiny_llada

hub = hub_server.hub  # the loopback Hub fixture
QUICK = dict(rounding="rtn", transform="none", weighting="uniform", w_bits=4, a_bits=16)


@pytest.fixture(scope="module")
def qmodel():
    tok = char_tokenizer()
    return quantize(tiny_llada(len(tok), tok.mask_token_id), FairCalibConfig(**QUICK), tokenizer=tok)


@pytest.fixture
def folder(qmodel, tmp_path):
    out = tmp_path / "saved"
    save_quantized(qmodel, out)
    return out


def test_push_refuses_a_corrupted_checkpoint_before_any_request(hub, folder):
    """W24: a truncated weights file, or one flipped data byte (its recorded digest no longer matches)."""
    weights = folder / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="model.safetensors: not a readable safetensors file.*refusing to push"):
        push_quantized(folder, "tester/truncated")
    flipped = bytearray(good)
    flipped[-10] ^= 0xFF  # inside the last tensor's data
    weights.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="does not match the digest .*refusing to push"):
        push_quantized(folder, "tester/flipped")
    assert hub.requests == []


def test_push_refuses_a_symlink_to_a_file_outside_the_folder(hub, folder):
    """W25: the link's target would be uploaded under the link's name."""
    (folder.parent / "secret.txt").write_text("api key")
    os.symlink(folder.parent / "secret.txt", folder / "notes.txt")
    with pytest.raises(ValueError, match="notes.txt is a symlink to .*secret.txt, outside the folder"):
        push_quantized(folder, "tester/linked")
    assert hub.requests == []
    os.symlink(folder / "README.md", folder / "CARD.md")  # a link inside the folder is its file
    (folder / "notes.txt").unlink()
    push_quantized(folder, "tester/linked")
    assert hub.files("tester/linked")["CARD.md"] == (folder / "README.md").read_bytes()


def test_push_of_a_folder_without_card_or_tokenizer_says_so(hub, folder, caplog):
    """W23: the push goes ahead (a model may have no tokenizer), with one warning for each missing part."""
    (folder / "README.md").unlink()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink(missing_ok=True)
    with caplog.at_level(logging.WARNING):
        push_quantized(folder, "tester/bare")
    assert "has no README.md" in caplog.text and "has no tokenizer files" in caplog.text
    assert "model.safetensors" in hub.files("tester/bare")


def test_a_failed_push_to_hub_names_no_deleted_folder(hub, qmodel):
    """W5: push_model (what FairCalibConfig(push_to_hub=...) runs) saves into a temporary folder that is gone
    when the error is read."""
    hub.fail_next("commit")
    with pytest.raises(HubPushError) as err:
        push_model(qmodel, "tester/flaky")
    message = str(err.value)
    assert "optimum-fair-push-" not in message and "the model to tester/flaky" in message
    assert "HTTP 500" in message and "rerun push_to_hub to retry" in message


def test_cli_push_without_a_token_names_the_flag(hub, folder, monkeypatch, capsys):
    """N11: at the CLI the token is --token, not token=."""
    monkeypatch.delenv("HF_TOKEN")
    assert main(["push", str(folder), "tester/no-token"]) == 1
    assert "--token" in capsys.readouterr().err
    assert hub.requests == []


def test_check_pushable_reads_every_weights_file(folder):
    shutil.copy(folder / "model.safetensors", folder / "model-extra.safetensors")
    (folder / "model-extra.safetensors").write_bytes(b"\x00" * 4)
    with pytest.raises(ValueError, match="model-extra.safetensors: not a readable"):
        push_quantized(folder, "tester/x")
