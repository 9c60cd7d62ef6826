"""Train the small LLaDA teacher that ships in ``optimum_fair/assets/teacher`` (a masked diffusion LM).

Recipe: byte-level BPE trained on the gensim Wikipedia train split, the native LLaDA
architecture, mask ratio t ~ U(eps, 1) per sequence, cross-entropy on masked positions (optionally
weighted 1/t as in LLaDA), AdamW with warmup + cosine. The budget is ``--steps`` and/or ``--minutes``
of training time; the schedule follows whichever is further along, so it always fully decays.

Usage::

    OMP_NUM_THREADS=1 python scripts/train_teacher.py --run-dir runs/teacher \\
        --output optimum_fair/assets/teacher --minutes 110 --threads 1 [--resume]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from optimum_fair.data import calibration_sequences, load_texts, token_stream
from optimum_fair.modeling import LLaDAConfig, LLaDAModelLM
from optimum_fair.modeling.tokens import require_mask_token

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = {"pad_token": "<|pad|>", "bos_token": "<|bos|>", "eos_token": "<|eos|>",
                  "mask_token": "<|mask|>"}
CHECKPOINT_GLOB = "checkpoint-*.pt"


@dataclass
class TrainArgs:
    """Everything a training run depends on (the CLI has one flag per field)."""

    run_dir: str = "runs/teacher"           # checkpoints, tokenizer, metrics.jsonl
    output: str | None = None               # final fp16 model + tokenizer (save_pretrained)
    train_data: str = "wiki"                # a load_texts name
    val_data: str = "wiki-val"              # a load_texts name
    vocab_size: int = 1024                  # byte-level BPE size, special tokens included
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    mlp_hidden_size: int = 704
    seq_len: int = 128
    batch_size: int = 32
    lr: float = 1e-3
    final_lr_ratio: float = 0.05            # cosine ends at lr * final_lr_ratio
    warmup_steps: int = 200
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    mask_eps: float = 0.15                  # t ~ U(mask_eps, 1)
    loss_weighting: str = "none"            # "none": mean CE on masked; "inv_t": LLaDA's 1/t weighting
    steps: int | None = None                # step budget (None: time only)
    minutes: float | None = None            # training-time budget (None: steps only)
    checkpoint_minutes: float = 5.0
    checkpoint_steps: int | None = None     # also checkpoint every N steps
    keep_checkpoints: int = 2
    eval_samples: int = 64                  # validation windows for masked accuracy / NLL
    bf16: bool = False                      # bf16 autocast; slower on CPUs without AMX (1.56 vs 1.24 s/step)
    threads: int | None = None
    device: str = "cpu"                     # "cuda" trains on a GPU (data and masks still drawn on CPU)
    seed: int = 0
    resume: bool = False

    def __post_init__(self) -> None:
        if self.steps is None and self.minutes is None:
            raise ValueError("TrainArgs: give a budget, --steps and/or --minutes")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"TrainArgs.steps must be >= 1, got {self.steps}")
        if self.minutes is not None and self.minutes <= 0:
            raise ValueError(f"TrainArgs.minutes must be > 0, got {self.minutes}")
        if self.loss_weighting not in ("none", "inv_t"):
            raise ValueError(f"TrainArgs.loss_weighting must be 'none' or 'inv_t', got {self.loss_weighting!r}")
        if not 0.0 < self.mask_eps < 1.0:
            raise ValueError(f"TrainArgs.mask_eps must be in (0, 1), got {self.mask_eps}")
        if self.vocab_size < 300:
            raise ValueError(f"TrainArgs.vocab_size must be >= 300 (256 bytes + specials), got {self.vocab_size}")


def train_tokenizer(texts: list[str], vocab_size: int, model_max_length: int) -> Any:
    """Byte-level BPE with ``SPECIAL_TOKENS`` (ids 0-3), wrapped as a transformers fast tokenizer."""

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS.values()), min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=model_max_length, **SPECIAL_TOKENS)


def build_config(args: TrainArgs, tokenizer: Any) -> Any:
    """LLaDAConfig for the teacher; special-token ids come from the tokenizer."""

    return LLaDAConfig(
        d_model=args.d_model, n_heads=args.n_heads, n_layers=args.n_layers,
        mlp_hidden_size=args.mlp_hidden_size, vocab_size=len(tokenizer), embedding_size=len(tokenizer),
        max_sequence_length=args.seq_len, rope_theta=10000.0, weight_tying=False,
        mask_token_id=require_mask_token(tokenizer), eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
    )


def mask_tokens(
    x: torch.Tensor, mask_id: int, eps: float, gen: torch.Generator, ratio: float | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward process: mask each token independently with probability t (per row).

    Args:
        x: (batch, seq) clean token ids.
        ratio: fixed mask ratio; ``None`` draws t ~ U(eps, 1) per row.

    Returns:
        noisy (batch, seq), mask (batch, seq) bool, t (batch,).
    """
    batch, seq = x.shape
    if ratio is None:
        t = eps + (1.0 - eps) * torch.rand(batch, generator=gen)
    else:
        t = torch.full((batch,), float(ratio))
    mask = torch.rand(batch, seq, generator=gen) < t[:, None]
    noisy = torch.where(mask, torch.full_like(x, mask_id), x)
    return noisy, mask, t


def diffusion_loss(
    logits: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, t: torch.Tensor, weighting: str
) -> torch.Tensor:
    """Cross-entropy on masked positions: plain mean, or LLaDA's sum(CE / t) / (batch * seq)."""
    # logits: (batch, seq, vocab); x, mask: (batch, seq); t: (batch,)
    ce = F.cross_entropy(logits[mask].float(), x[mask], reduction="none")  # (n_masked,)
    if weighting == "none":
        return ce.mean()
    inv_t = (1.0 / t)[:, None].expand_as(mask)[mask]  # (n_masked,)
    return (ce * inv_t).sum() / mask.numel()


@torch.no_grad()
def masked_eval(
    model: torch.nn.Module, seqs: torch.Tensor, mask_id: int, ratio: float = 0.5, seed: int = 0,
    batch_size: int = 32,
) -> dict[str, Any]:
    """Masked-token accuracy and NLL at a fixed mask ratio (float32, seeded masks).

    Returns a dict with ``accuracy``, ``nll``, ``n_masked`` and ``targets`` / ``predictions``
    (1-D LongTensors over the masked positions, in order) for further comparisons.
    """
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    targets, preds, nll_sum = [], [], 0.0
    for start in range(0, seqs.shape[0], batch_size):
        x = seqs[start : start + batch_size]
        noisy, mask, _ = mask_tokens(x, mask_id, 0.0, gen, ratio=ratio)
        x, mask = x.to(device), mask.to(device)
        logits = model(input_ids=noisy.to(device)).logits.float()  # (batch, seq, vocab)
        nll_sum += F.cross_entropy(logits[mask], x[mask], reduction="sum").item()
        targets.append(x[mask].cpu())
        preds.append(logits[mask].argmax(-1).cpu())
    model.train(was_training)
    tgt, prd = torch.cat(targets), torch.cat(preds)
    n = max(int(tgt.numel()), 1)
    return {"accuracy": (tgt == prd).float().mean().item(), "nll": nll_sum / n, "n_masked": n,
            "targets": tgt, "predictions": prd}


def lr_at(step: int, progress: float, args: TrainArgs) -> float:
    """Linear warmup over ``warmup_steps``, then cosine from lr to lr * final_lr_ratio over progress."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    cos = 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    return args.lr * (args.final_lr_ratio + (1.0 - args.final_lr_ratio) * cos)


def progress_of(step: int, elapsed_s: float, args: TrainArgs) -> float:
    """Fraction of the budget used: the larger of the step and the time fraction."""
    parts = []
    if args.steps is not None:
        parts.append(step / args.steps)
    if args.minutes is not None:
        parts.append(elapsed_s / (60.0 * args.minutes))
    return max(parts)


@dataclass
class RunState:
    """The mutable part of a run: what a checkpoint stores."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    gen: torch.Generator  # data windows and masks
    step: int = 0
    elapsed_s: float = 0.0


_ARCH_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "mlp_hidden_size", "seq_len", "train_data")


def prepare_tokenizer(args: TrainArgs, run_dir: Path) -> Any:
    """Load ``run_dir/tokenizer`` if present (resume), else train it on the train texts and save it."""

    path = run_dir / "tokenizer"
    if (path / "tokenizer.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(path)
    else:

        texts = list(load_texts(args.train_data)["text"])
        tokenizer = train_tokenizer(texts, args.vocab_size, model_max_length=args.seq_len)
        tokenizer.save_pretrained(path)
        logger.info("trained a %d-token byte-level BPE, saved to %s", len(tokenizer), path)
    require_mask_token(tokenizer)
    return tokenizer


def load_token_data(args: TrainArgs, tokenizer: Any, run_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokenised train stream (n_tokens,) and validation windows (n_val, seq_len).

    Cached in ``run_dir/tokens.safetensors`` (next to the tokenizer that made them), so a resumed run,
    or one moved to a machine without the text's wheels, reads them instead of re-tokenising.
    """

    path = run_dir / "tokens.safetensors"
    if path.is_file():
        blob = load_file(path)
        if blob["val_seqs"].shape[1] != args.seq_len:
            raise ValueError(f"{path}: validation windows of {blob['val_seqs'].shape[1]} tokens, "
                             f"--seq-len is {args.seq_len}; delete the file to re-tokenise")
        return blob["train_ids"].long(), blob["val_seqs"].long()

    train_ids = token_stream(load_texts(args.train_data), tokenizer)
    if train_ids.numel() <= args.seq_len:
        raise ValueError(f"train_data {args.train_data!r} has {train_ids.numel()} tokens; need > {args.seq_len}")
    n_val = min(args.eval_samples, token_stream(load_texts(args.val_data), tokenizer).numel() // args.seq_len)
    val_seqs = calibration_sequences(args.val_data, tokenizer, max(n_val, 1), args.seq_len, seed=0,
                                     allow_overlap=n_val < 1)  # (n_val, seq_len)
    save_file({"train_ids": train_ids.int().contiguous(), "val_seqs": val_seqs.int().contiguous()}, path)
    return train_ids, val_seqs


def init_state(args: TrainArgs, tokenizer: Any) -> RunState:
    """Fresh seeded model (float32 master weights), AdamW (decay on matrices only) and generator."""

    torch.manual_seed(args.seed)
    model = LLaDAModelLM(build_config(args, tokenizer)).float().to(args.device)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95),
    )
    gen = torch.Generator().manual_seed(args.seed + 1)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("LLaDA teacher: %.2f M parameters", n_params / 1e6)
    return RunState(model=model, optimizer=optimizer, gen=gen)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint with the highest step in ``run_dir`` (None if there is none)."""
    found = sorted(run_dir.glob(CHECKPOINT_GLOB))
    return found[-1] if found else None


def save_checkpoint(state: RunState, args: TrainArgs, run_dir: Path) -> Path:
    """Write ``checkpoint-<step>.pt`` atomically and keep only the newest ``keep_checkpoints``."""
    path = run_dir / f"checkpoint-{state.step:08d}.pt"
    blob = {"model": state.model.state_dict(), "optimizer": state.optimizer.state_dict(),
            "gen": state.gen.get_state(), "step": state.step, "elapsed_s": state.elapsed_s,
            "args": asdict(args)}
    tmp = path.with_suffix(".tmp")
    torch.save(blob, tmp)
    tmp.replace(path)
    for old in sorted(run_dir.glob(CHECKPOINT_GLOB))[: -args.keep_checkpoints]:
        old.unlink()
    return path


def load_checkpoint(state: RunState, path: Path, args: TrainArgs) -> None:
    """Restore model, optimizer, generator, step and elapsed time; the architecture must match."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    saved = blob["args"]
    diff = {k: (saved.get(k), getattr(args, k)) for k in _ARCH_FIELDS if saved.get(k) != getattr(args, k)}
    if diff:
        raise ValueError(f"--resume: checkpoint {path} was trained with other settings (saved, now): {diff}")
    state.model.load_state_dict(blob["model"])
    state.optimizer.load_state_dict(blob["optimizer"])
    state.gen.set_state(blob["gen"])
    state.step, state.elapsed_s = int(blob["step"]), float(blob["elapsed_s"])
    logger.info("resumed from %s at step %d (%.1f min trained)", path, state.step, state.elapsed_s / 60)


def train_step(state: RunState, train_ids: torch.Tensor, mask_id: int, args: TrainArgs) -> float:
    """One optimizer step on ``batch_size`` random windows of the train stream; returns the loss."""
    # train_ids: (n_tokens,)
    starts = torch.randint(0, train_ids.numel() - args.seq_len + 1, (args.batch_size,), generator=state.gen)
    x = train_ids[starts[:, None] + torch.arange(args.seq_len)]  # (batch, seq)
    noisy, mask, t = mask_tokens(x, mask_id, args.mask_eps, state.gen)
    dev = torch.device(args.device)
    x, noisy, mask, t = (v.to(dev, non_blocking=True) for v in (x, noisy, mask, t))
    lr = lr_at(state.step, progress_of(state.step, state.elapsed_s, args), args)
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=args.bf16):
        logits = state.model(input_ids=noisy).logits  # (batch, seq, vocab)
    loss = diffusion_loss(logits, x, mask, t, args.loss_weighting)
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(state.model.parameters(), args.grad_clip)
    state.optimizer.step()
    return loss.item()


def record(state: RunState, val_seqs: torch.Tensor, mask_id: int, losses: list[float], run_dir: Path) -> dict:
    """Evaluate on the validation windows and append a line to ``run_dir/metrics.jsonl``."""
    ev = masked_eval(state.model, val_seqs, mask_id, ratio=0.5, seed=1234)
    row = {"step": state.step, "minutes": round(state.elapsed_s / 60, 2),
           "train_loss": round(sum(losses) / max(len(losses), 1), 4),
           "val_masked_acc": round(ev["accuracy"], 4), "val_nll": round(ev["nll"], 4)}
    with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")
    logger.info("step %(step)d  %(minutes).1f min  loss %(train_loss).3f  val acc %(val_masked_acc).3f  "
                "val nll %(val_nll).3f", row)
    return row


def run_loop(state: RunState, train_ids: torch.Tensor, val_seqs: torch.Tensor, mask_id: int,
             args: TrainArgs, run_dir: Path) -> dict:
    """Train until the budget is used, checkpointing and evaluating periodically; returns the last eval."""
    state.model.train()
    bar = tqdm(total=args.steps, initial=state.step, desc="teacher", unit="step", mininterval=5.0)
    losses: list[float] = []
    row: dict | None = None
    last_ckpt_step, last_ckpt_time = state.step, state.elapsed_s
    while progress_of(state.step, state.elapsed_s, args) < 1.0:
        t0 = time.monotonic()
        losses.append(train_step(state, train_ids, mask_id, args))
        state.step += 1
        state.elapsed_s += time.monotonic() - t0
        bar.update(1)
        if state.step % 10 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.3f}",
                            min=f"{state.elapsed_s / 60:.1f}")
        by_steps = args.checkpoint_steps is not None and state.step - last_ckpt_step >= args.checkpoint_steps
        by_time = state.elapsed_s - last_ckpt_time >= 60.0 * args.checkpoint_minutes
        if by_steps or by_time:
            row = record(state, val_seqs, mask_id, losses, run_dir)
            save_checkpoint(state, args, run_dir)
            losses, last_ckpt_step, last_ckpt_time = [], state.step, state.elapsed_s
    bar.close()
    if state.step != last_ckpt_step or row is None:
        row = record(state, val_seqs, mask_id, losses, run_dir)
        save_checkpoint(state, args, run_dir)
    return row


def export(model: torch.nn.Module, tokenizer: Any, output: str | Path, args: TrainArgs, last: dict) -> Path:
    """Write fp16 safetensors + config + tokenizer (+ training_args.json) to ``output``."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    model.to("cpu", torch.float16).save_pretrained(out)
    model.to(device, torch.float32)
    tokenizer.save_pretrained(out)
    summary = {"args": asdict(args), "final": last}
    (out / "training_args.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    logger.info("saved the teacher to %s", out)
    return out


def train(args: TrainArgs) -> dict:
    """Run (or resume) a training run; returns the final validation row. Exports if ``args.output``."""
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = prepare_tokenizer(args, run_dir)
    mask_id = require_mask_token(tokenizer)
    train_ids, val_seqs = load_token_data(args, tokenizer, run_dir)
    logger.info("train stream %d tokens, %d validation windows", train_ids.numel(), val_seqs.shape[0])
    state = init_state(args, tokenizer)
    ckpt = latest_checkpoint(run_dir) if args.resume else None
    if args.resume and ckpt is None:
        logger.warning("--resume: no checkpoint in %s, starting from scratch", run_dir)
    if ckpt is not None:
        load_checkpoint(state, ckpt, args)
    last = run_loop(state, train_ids, val_seqs, mask_id, args, run_dir)
    if args.output:
        export(state.model, tokenizer, args.output, args, last)
    return last


def parse_args(argv: list[str] | None = None) -> TrainArgs:
    """One flag per ``TrainArgs`` field (``--run-dir``, ``--no-bf16``, ``--resume``, ...)."""
    parser = argparse.ArgumentParser(prog="python -m optimum_fair.train_teacher", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(TrainArgs):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
            continue
        kind = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
        parser.add_argument(flag, type=kind, default=f.default)
    return TrainArgs(**vars(parser.parse_args(argv)))


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    train(args)


if __name__ == "__main__":
    main()
