"""Smoke tests of the teacher trainer on a tiny model (never real training), and the shipped teacher."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch

import optimum_fair  # importing registers the native model types with the Auto classes
from scripts.train_teacher import (
    TrainArgs,
    diffusion_loss,
    latest_checkpoint,
    lr_at,
    mask_tokens,
    parse_args,
    train,
)

TEACHER = Path(optimum_fair.__file__).parent / "assets" / "teacher"


def tiny_args(run_dir: Path, **over) -> TrainArgs:
    base = {"run_dir": str(run_dir), "train_data": "lee", "val_data": "lee", "vocab_size": 300,
            "d_model": 32, "n_layers": 1, "n_heads": 2, "mlp_hidden_size": 64, "seq_len": 32,
            "batch_size": 8, "lr": 3e-3, "warmup_steps": 5, "steps": 40, "checkpoint_steps": 20,
            "eval_samples": 8, "bf16": False}
    base.update(over)
    return TrainArgs(**base)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_training_lowers_the_loss_and_exports(tmp_path):
    from transformers import AutoModel, AutoTokenizer

    run_dir, out = tmp_path / "run", tmp_path / "out"
    last = train(tiny_args(run_dir, output=str(out)))
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [20, 40]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] < math.log(300) + 0.3
    assert last["val_nll"] < math.log(300) - 0.3
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModel.from_pretrained(out)
    assert tok.mask_token_id is not None and tok.mask_token_id == model.config.mask_token_id
    assert model.config.vocab_size == len(tok) == 300
    assert next(model.parameters()).dtype == torch.float16
    ids = torch.tensor([[tok.mask_token_id] * 8])
    assert model.float()(input_ids=ids).logits.shape == (1, 8, 300)


def test_resume_continues_from_the_saved_step_and_matches(tmp_path, caplog):
    run_dir = tmp_path / "run"
    train(tiny_args(run_dir, steps=30, checkpoint_steps=10))
    final = latest_checkpoint(run_dir)
    assert final.name == "checkpoint-00000030.pt"
    reference = torch.load(final, weights_only=True)["model"]
    final.unlink()  # "crash" after step 20
    caplog.set_level(logging.INFO, logger="scripts.train_teacher")
    train(tiny_args(run_dir, steps=30, checkpoint_steps=10, resume=True))
    assert "at step 20" in caplog.text
    assert [r["step"] for r in read_metrics(run_dir)] == [10, 20, 30, 30]
    resumed = torch.load(latest_checkpoint(run_dir), weights_only=True)
    assert resumed["step"] == 30
    for name, value in reference.items():  # deterministic: same weights as the uninterrupted run
        assert torch.equal(value, resumed["model"][name]), name


def test_resume_refuses_another_architecture(tmp_path):
    run_dir = tmp_path / "run"
    train(tiny_args(run_dir, steps=2, checkpoint_steps=None))
    with pytest.raises(ValueError, match="d_model"):
        train(tiny_args(run_dir, steps=4, d_model=64, n_heads=2, resume=True))


def test_masking_and_loss_weighting():
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(4, 50, (64, 128))
    noisy, mask, t = mask_tokens(x, mask_id=3, eps=0.15, gen=gen)
    assert t.min() >= 0.15 and t.max() <= 1.0
    assert torch.equal(noisy[mask], torch.full_like(noisy[mask], 3)) and torch.equal(noisy[~mask], x[~mask])
    assert abs(mask.float().mean(1) - t).max() < 0.2  # per-row ratio follows t
    logits = torch.randn(64, 128, 50)
    plain = diffusion_loss(logits, x, mask, t, "none")
    ref = torch.nn.functional.cross_entropy(logits[mask], x[mask])
    assert torch.allclose(plain, ref)
    ones = torch.ones(64)
    weighted = diffusion_loss(logits, x, mask, ones, "inv_t")
    assert torch.allclose(weighted, ref * mask.sum() / mask.numel())


def test_schedule_and_cli():
    args = parse_args(["--steps", "100", "--warmup-steps", "10", "--no-bf16", "--d-model", "64"])
    assert args.steps == 100 and args.bf16 is False and args.d_model == 64 and args.minutes is None
    assert lr_at(0, 0.0, args) == pytest.approx(args.lr / 10)
    assert lr_at(10, 0.0, args) == pytest.approx(args.lr)
    assert lr_at(100, 1.0, args) == pytest.approx(args.lr * args.final_lr_ratio)
    with pytest.raises(ValueError, match="budget"):
        TrainArgs()
    with pytest.raises(ValueError, match="loss_weighting"):
        TrainArgs(steps=1, loss_weighting="sqrt")


def test_shipped_teacher_loads_offline(monkeypatch):
    if not (TEACHER / "config.json").is_file():
        pytest.skip("the shipped teacher is not in this checkout")
    from transformers import AutoModel, AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = AutoTokenizer.from_pretrained(TEACHER)
    model = AutoModel.from_pretrained(TEACHER)
    assert model.config.model_type == "llada"
    assert tok.mask_token == "<|mask|>" and tok.mask_token_id == model.config.mask_token_id
    assert len(tok) == model.config.vocab_size
    assert (TEACHER / "model.safetensors").stat().st_size < 25 * 2**20
