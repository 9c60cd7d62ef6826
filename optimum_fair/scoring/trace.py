"""`DecodeTrace`: what one batched diffusion decode did, step by step.

A trace keeps the final sequences and, for every generated position, the step at which it was
committed. Everything else about the trajectory follows from those two tensors: the write frontier
C_t is ``commit_step == t`` and the state before step t is the final sequence with every position
committed at step >= t put back to the mask token (a committed token is never revised).
Optional records: the per-step top-1 reading at every generated position (``record_topk``) and the
states themselves (``record_states``), kept as a cross-check and for callers that want them stored.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import Tensor


@dataclass
class DecodeTrace:
    """The result of one batched decode.

    Attributes:
        sequences: (batch, prompt_len + gen_len) final token ids (prompt, left-padded, then answer).
        commit_step: (batch, gen_len) 0-based step at which each generated position was committed.
        commit_margin: (batch, gen_len) top-1 minus top-2 probability of the decoding model at the
            commit, read from the softmax of the logits the sampler used (after classifier-free
            guidance, before temperature, top-p or top-k; the mask token excluded, as everywhere).
        prompt_len: number of prompt positions (padding included).
        gen_len: number of generated positions.
        steps: number of decoding steps T (one forward pass each).
        block_length: semi-autoregressive block length (``gen_len`` for a single block).
        mask_id: the mask token id.
        logit_shift: 1 when the prediction for position i is read at ``logits[:, i - 1]`` (Dream).
        policy: the sampler and its commit rule, e.g. ``"llada/low_confidence"``.
        attention_mask: (batch, prompt_len + gen_len) 1 for real tokens, 0 for padding; None if none.
        top1_token: (steps, batch, gen_len) top-1 token at every generated position in the state
            before each step (raw reading, also at committed positions); None unless recorded.
        top1_prob: (steps, batch, gen_len) its probability; None unless recorded.
        states: (steps, batch, prompt_len + gen_len) the state x_t before each step; None unless
            recorded (``state_at`` rebuilds it exactly either way).
    """

    sequences: Tensor
    commit_step: Tensor
    commit_margin: Tensor
    prompt_len: int
    gen_len: int
    steps: int
    block_length: int
    mask_id: int
    logit_shift: int = 0
    policy: str = ""
    attention_mask: Tensor | None = None
    top1_token: Tensor | None = None
    top1_prob: Tensor | None = None
    states: Tensor | None = None

    def __post_init__(self) -> None:
        batch = self.sequences.shape[0]
        if self.sequences.shape != (batch, self.prompt_len + self.gen_len):
            raise ValueError(
                f"sequences must have shape (batch, prompt_len + gen_len) = "
                f"(batch, {self.prompt_len + self.gen_len}), got {tuple(self.sequences.shape)}"
            )
        for name in ("commit_step", "commit_margin"):
            if getattr(self, name).shape != (batch, self.gen_len):
                raise ValueError(f"{name} must have shape ({batch}, {self.gen_len})")
        if self.block_length < 1 or self.gen_len % self.block_length:
            raise ValueError(f"block_length must divide gen_len={self.gen_len}, got {self.block_length}")
        if self.steps % self.num_blocks:
            raise ValueError(f"steps must be a multiple of the number of blocks ({self.num_blocks})")
        for name in ("top1_token", "top1_prob"):
            value = getattr(self, name)
            if value is not None and value.shape != (self.steps, batch, self.gen_len):
                raise ValueError(f"{name} must have shape ({self.steps}, {batch}, {self.gen_len})")
        if self.states is not None and self.states.shape != (self.steps, *self.sequences.shape):
            raise ValueError(f"states must have shape ({self.steps}, {batch}, {self.sequences.shape[1]})")

    # ---- derived views -------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return int(self.sequences.shape[0])

    @property
    def generated(self) -> Tensor:
        """(batch, gen_len) the committed answer tokens."""
        return self.sequences[:, self.prompt_len :]

    @property
    def num_blocks(self) -> int:
        return self.gen_len // self.block_length

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.num_blocks

    def block_bounds(self, step: int) -> tuple[int, int]:
        """Generation-window slice [start, end) of the block decoded at ``step``."""
        block = step // self.steps_per_block
        return block * self.block_length, (block + 1) * self.block_length

    def frontier(self, step: int) -> Tensor:
        """(batch, gen_len) bool: the write frontier C_t, positions committed at ``step``."""
        return self.commit_step == step

    def masked_at(self, step: int) -> Tensor:
        """(batch, gen_len) bool: positions still masked in the state before ``step``."""
        return self.commit_step >= step

    def commits_per_step(self) -> Tensor:
        """(steps, batch) number of positions committed at each step."""
        steps = torch.arange(self.steps, device=self.commit_step.device)
        # hits: (steps, batch, gen_len)
        hits = self.commit_step.unsqueeze(0) == steps.view(-1, 1, 1)
        return hits.sum(-1)

    def steps_used(self) -> Tensor:
        """(batch,) steps that committed at least one position of each row: the forward passes the row needed
        under a parallel rule, whose filled blocks leave their remaining slots empty (a lower bound for a
        sampler that runs steps committing nothing, as Dream's schedule's first step)."""
        return (self.commits_per_step() > 0).sum(0)

    def steps_per_token(self) -> float:
        """Mean over rows of `steps_used` / gen_len: 1 for one commit per step, less when steps commit several."""
        return float(self.steps_used().double().mean()) / self.gen_len

    def state_at(self, step: int) -> Tensor:
        """(batch, prompt_len + gen_len) the state x_t before ``step`` (``step == steps``: final)."""
        if not 0 <= step <= self.steps:
            raise ValueError(f"step must be in [0, {self.steps}], got {step}")
        if self.states is not None and step < self.steps:
            return self.states[step]
        state = self.sequences.clone()
        gen = state[:, self.prompt_len :]
        gen[self.masked_at(step)] = self.mask_id
        return state

    # ---- persistence ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Plain dict of tensors, ints and strings (what ``save`` writes)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict) -> DecodeTrace:
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"data has unknown DecodeTrace fields: {sorted(unknown)}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        """Write the trace with ``torch.save`` (tensors moved to CPU)."""
        data = {k: (v.cpu() if isinstance(v, Tensor) else v) for k, v in self.to_dict().items()}
        torch.save(data, Path(path))

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device = "cpu") -> DecodeTrace:
        """Read a trace written by ``save`` (weights-only unpickling)."""
        data = torch.load(Path(path), map_location=map_location, weights_only=True)
        return cls.from_dict(data)
