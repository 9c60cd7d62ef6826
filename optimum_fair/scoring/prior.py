"""Stage I: the position prior w-bar from probe rollouts of the full-precision teacher (the paper's section 2).

For each probe (a calibration prefix followed by K masked positions), the teacher decodes the window
under the random commit policy inside semi-autoregressive blocks, committing its argmax. For every
window position i and step t (1-based, T steps):

    w_i += lambda_0(t) * 1{i in C_t}                     frontier hit
    w_i += lambda_1 * c~_{t,i} * 1{i masked before t}     masked-stage reliability

c~ is the teacher's reliability at still-masked positions in the state before step t, divided by its
maximum over that row's masked positions. The window's weights are averaged over probes, normalised
to mean 1 and placed on the last K positions of a calibration sequence of length N; every other
position gets the floor epsilon. With a logit shift (Dream), the hidden state at position i - 1 makes
the prediction for position i, so the weights move one position left.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..enums import BoostSchedule, Confidence, Remasking, coerce_enum
from .forward import CachedLogits, LogitsFn
from .policies import confidence_scores
from .sampler import llada_decode

logger = logging.getLogger(__name__)


def boost(t: Tensor, steps: int, beta: float, schedule: BoostSchedule | str) -> Tensor:
    """lambda_0(t) for 1-based steps t: early 1 + beta(1 - (t-1)/(T-1)), flat 1, late 1 + beta(t-1)/(T-1)."""
    schedule = coerce_enum(BoostSchedule, schedule, "schedule")
    frac = (t.float() - 1) / max(steps - 1, 1)
    if schedule is BoostSchedule.EARLY:
        return 1 + beta * (1 - frac)
    if schedule is BoostSchedule.LATE:
        return 1 + beta * frac
    return torch.ones_like(frac)


def reliability(probs: Tensor, kind: Confidence | str) -> Tensor:
    """c_{t,i} >= 0 from probabilities (..., vocab): max prob, top1-top2 margin, or 1 - H / log V."""
    kind = coerce_enum(Confidence, kind, "reliability")
    if kind is Confidence.NEG_ENTROPY:  # negative entropy, shifted to [0, 1] so c / max is meaningful
        return 1 + confidence_scores(probs, kind) / math.log(probs.shape[-1])
    return confidence_scores(probs, kind)


def reliability_sum(commit_step: Tensor, reliab: Tensor) -> Tensor:
    """(P, K) sum over steps of c~_{t,i} 1{i masked before t}: the reliability term before lambda_1.

    commit_step: (P, K) 0-based commit step of each window position.
    reliab: (T, P, K) teacher reliability in the state before each step (any value where not masked).
    """
    steps = reliab.shape[0]
    step_idx = torch.arange(steps, device=commit_step.device).view(steps, 1, 1)
    masked = commit_step.unsqueeze(0) >= step_idx  # (T, P, K): still masked before step t
    c = torch.where(masked, reliab.float(), torch.zeros((), device=reliab.device))
    row_max = c.amax(-1, keepdim=True).clamp(min=1e-12)  # (T, P, 1)
    return (c / row_max).sum(0)


def window_scores(commit_step: Tensor, rel_sum: Tensor, steps: int, beta: float, schedule: BoostSchedule | str,
                  lambda1: float) -> tuple[Tensor, Tensor]:
    """Per-probe frontier and reliability terms over the window.

    commit_step: (P, K) 0-based commit step of each window position; rel_sum: (P, K) `reliability_sum`.
    Returns (frontier (P, K), reliability (P, K)); w = frontier + reliability before averaging.
    """
    frontier = boost(commit_step + 1, steps, beta, schedule)  # 1-based steps; each position committed once
    return frontier, lambda1 * rel_sum


@dataclass
class PositionPrior:
    """The Stage I prior over the N positions of a calibration sequence, and how it was made."""

    weights: Tensor  # (N,) >= floor; the window's mean is 1
    window: int  # K
    floor: float
    settings: dict = field(default_factory=dict)  # decode settings, num_probes, model, ...
    # the probe rollouts' sufficient statistics (P, K) each: commit steps and `reliability_sum`; with them
    # the prior can be re-weighted (other beta, lambda_1, floor, ...) without rolling out again
    commit_step: Tensor | None = None
    reliability_sum: Tensor | None = None

    @property
    def seq_len(self) -> int:
        return int(self.weights.shape[0])

    def save(self, path: str | Path) -> Path:
        """Write `prior.safetensors` (weights, and the rollout statistics when known) and `prior.json`."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {"weights": self.weights.float().contiguous()}
        if self.commit_step is not None:
            tensors.update(commit_step=self.commit_step.long().contiguous(),
                           reliability_sum=self.reliability_sum.float().contiguous())
        save_file(tensors, str(path / "prior.safetensors"))
        meta = {"window": self.window, "floor": self.floor, "seq_len": self.seq_len, "settings": self.settings}
        (path / "prior.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> PositionPrior:
        path = Path(path)
        for name in ("prior.safetensors", "prior.json"):
            if not (path / name).is_file():
                raise ValueError(f"prior {path}: {name} not found (expected a directory written by PositionPrior.save)")
        meta = json.loads((path / "prior.json").read_text())
        tensors = load_file(str(path / "prior.safetensors"))
        weights = tensors["weights"]
        if weights.shape != (meta["seq_len"],):
            raise ValueError(f"prior {path}: weights have shape {tuple(weights.shape)}, json says {meta['seq_len']}")
        commit, rel = tensors.get("commit_step"), tensors.get("reliability_sum")
        if commit is not None and (rel is None or commit.shape != rel.shape or commit.shape[-1] != meta["window"]):
            raise ValueError(f"prior {path}: rollout statistics must both be (probes, window={meta['window']})")
        return cls(weights, int(meta["window"]), float(meta["floor"]), meta.get("settings", {}), commit, rel)

    def differences(self, expected: dict) -> dict:
        """{setting: (this prior's value, expected value)} for every setting of `expected` that differs."""
        return {k: (self.settings.get(k), v) for k, v in expected.items() if self.settings.get(k) != v}

    def check_compatible(self, expected: dict, strict: bool = True) -> None:
        """Compare the settings this prior was made with to `expected`; raise (or warn) on differences."""
        diffs = self.differences(expected)
        if not diffs:
            return
        text = ", ".join(f"{k}: prior has {a!r}, run wants {b!r}" for k, (a, b) in sorted(diffs.items()))
        if strict:
            raise ValueError(f"the saved prior was made with other settings ({text})")
        logger.warning("using a prior made with other settings (%s)", text)


def place_in_sequence(window_weights: Tensor, seq_len: int, floor: float, logit_shift: int = 0) -> Tensor:
    """Window weights (K,) -> (N,) prior: normalised to window mean 1, floor elsewhere, shifted by logit_shift."""
    K = window_weights.shape[0]
    if K + logit_shift > seq_len:
        raise ValueError(f"window ({K}) + logit_shift ({logit_shift}) exceeds seq_len ({seq_len})")
    w = window_weights.float() / window_weights.float().mean()
    out = torch.full((seq_len,), float(floor))
    end = seq_len - logit_shift
    out[end - K:end] = w.clamp(min=floor)
    return out


class _ObservedCache:
    """A prefix `CachedLogits` that records the reliability of every window position each forward reads
    (0 at the positions before the block, which are committed and never read by `reliability_sum`)."""

    mode = "prefix"

    def __init__(self, cache: CachedLogits, seen: list[Tensor], prompt_len: int, window: int, logit_shift: int,
                 mask_id: int, kind: str) -> None:
        self.cache, self.seen, self.prompt_len, self.size = cache, seen, prompt_len, window
        self.shift, self.mask_id, self.kind = logit_shift, mask_id, kind

    def _record(self, logits: Tensor, start: int) -> Tensor:
        """logits (b, L, vocab) of canvas positions start..start + L - 1; position p is predicted at p - shift."""
        first = max(0, start + self.shift - self.prompt_len)  # first window index read
        last = min(self.size, start + self.shift - self.prompt_len + logits.shape[1])
        row = self.prompt_len + first - self.shift - start
        probs = logits[:, row:row + last - first].float().softmax(-1)  # (b, last - first, vocab)
        probs[..., self.mask_id] = 0.0  # the mask token is never proposed
        rel = torch.zeros(logits.shape[0], self.size, device=logits.device)  # (b, K)
        rel[:, first:last] = reliability(probs / probs.sum(-1, keepdim=True), self.kind)
        self.seen.append(rel)
        return logits

    def refresh(self, x: Tensor, attention_mask: Tensor | None) -> Tensor:
        return self._record(self.cache.refresh(x, attention_mask), 0)

    def window(self, x: Tensor, attention_mask: Tensor | None, start: int, end: int) -> Tensor:
        return self._record(self.cache.window(x, attention_mask, start, end), start)


def _per_step(trace, seen: list[Tensor]) -> Tensor:
    """(T, b, K) reliabilities: the readings of the forwards in the steps that ran one (a step runs a forward
    iff some row commits in it), zeros in the empty slots a parallel rule leaves after a filled block."""
    ran = (trace.commits_per_step() > 0).any(-1)  # (T,)
    out = torch.zeros(trace.steps, *seen[0].shape, device=seen[0].device)
    out[ran] = torch.stack(seen)
    return out


@torch.no_grad()
def probe_rollouts(logits_fn: LogitsFn, prompts: Tensor, window: int, block_length: int, steps: int,
                   mask_id: int, logit_shift: int, reliability_kind: str, batch_size: int,
                   generator: torch.Generator | None = None, cache: CachedLogits | None = None,
                   threshold: float | None = None, factor: float | None = None) -> tuple[Tensor, Tensor]:
    """Random-commit rollouts of the teacher over a K-token window after each prompt.

    prompts: (P, N - K) calibration prefixes. Returns commit_step (P, K) and reliability (T, P, K).
    ``cache``: run them on a *prefix* approximate KV cache (issue 34): each block's first step is the exact
    forward, later steps recompute the block and the masked suffix only, so every still-masked position gets
    its (approximate) reliability. The commit order draws are the same, so commit_step equals the uncached one.
    ``threshold`` / ``factor``: the serving policy's rollouts instead (issue 34): the teacher's greedy
    low-confidence decode with that parallel rule; the step slots a filled block leaves empty run no forward
    and add nothing to the reliability term.
    """
    if cache is not None and getattr(cache, "mode", None) != "prefix":
        raise ValueError(f"cache: Stage I rollouts read every masked position, so only a 'prefix' cache fits, "
                         f"got mode {getattr(cache, 'mode', None)!r}")
    served = threshold is not None or factor is not None
    policy = dict(remasking=Remasking.LOW_CONFIDENCE if served else Remasking.RANDOM, threshold=threshold,
                  factor=factor, generator=generator, logit_shift=logit_shift, temperature=0.0)
    commits, reliabs = [], []
    for start in range(0, prompts.shape[0], batch_size):
        batch = prompts[start:start + batch_size]
        seen: list[Tensor] = []
        if cache is not None:
            observer = _ObservedCache(cache, seen, batch.shape[1], window, logit_shift, mask_id, reliability_kind)
            trace = llada_decode(logits_fn, batch, window, block_length, steps, mask_id, cache=observer, **policy)
            commits.append(trace.commit_step)
            reliabs.append(_per_step(trace, seen))  # (T, b, K)
            continue

        def observed(x: Tensor, seen=seen, prompt_len=batch.shape[1], **kw) -> Tensor:
            logits = logits_fn(x, **kw)  # (b, seq, vocab)
            s = prompt_len - logit_shift
            probs = logits[:, s:s + window].float().softmax(-1)  # (b, K, vocab)
            probs[..., mask_id] = 0.0  # the mask token is never proposed
            seen.append(reliability(probs / probs.sum(-1, keepdim=True), reliability_kind))  # (b, K)
            return logits

        trace = llada_decode(observed, batch, window, block_length, steps, mask_id, **policy)
        commits.append(trace.commit_step)
        reliabs.append(_per_step(trace, seen))  # (T, b, K)
    return torch.cat(commits), torch.cat(reliabs, dim=1)


def prior_from_stats(commit_step: Tensor, rel_sum: Tensor, seq_len: int, steps: int, beta: float,
                     schedule: BoostSchedule | str, lambda1: float, floor: float, logit_shift: int = 0,
                     frontier_weight: float = 1.0, settings: dict | None = None) -> PositionPrior:
    """The prior from the rollout statistics (commit steps and `reliability_sum`, (P, K) each)."""
    if frontier_weight < 0 or lambda1 < 0 or frontier_weight + lambda1 == 0:
        raise ValueError(f"frontier_weight ({frontier_weight}) and lambda1 ({lambda1}) must be >= 0, not both 0")
    frontier, rel = window_scores(commit_step, rel_sum, steps, beta, schedule, lambda1)
    frontier = frontier_weight * frontier  # 0: the reliability-only ablation
    window_weights = (frontier + rel).mean(0)  # (K,)
    weights = place_in_sequence(window_weights, seq_len, floor, logit_shift)
    return PositionPrior(weights, commit_step.shape[1], floor, dict(settings or {}), commit_step, rel_sum)


def prior_from_rollouts(commit_step: Tensor, reliab: Tensor, **kw) -> PositionPrior:
    """Average the per-probe terms and place them in the sequence (see module docstring).

    commit_step: (P, K); reliab: (T, P, K); ``kw``: the arguments of `prior_from_stats`."""
    return prior_from_stats(commit_step, reliability_sum(commit_step, reliab), **kw)


def saturation(commit_step: Tensor, rel_sum: Tensor, **kw) -> float:
    """Relative L2 distance between the priors from the first half of the probes and from all of them.

    commit_step, rel_sum: (P, K) rollout statistics; ``kw``: the arguments of `prior_from_stats`."""
    half = commit_step.shape[0] // 2
    if half == 0:
        raise ValueError("saturation needs at least 2 probes")
    a = prior_from_stats(commit_step[:half], rel_sum[:half], **kw).weights
    b = prior_from_stats(commit_step, rel_sum, **kw).weights
    return float((a - b).norm() / b.norm())


def settings_dict(**values) -> dict:
    """JSON-safe settings record (enums to their values)."""
    return {k: getattr(v, "value", v) for k, v in values.items()}


__all__ = [
    "PositionPrior",
    "boost",
    "place_in_sequence",
    "prior_from_rollouts",
    "prior_from_stats",
    "probe_rollouts",
    "reliability",
    "reliability_sum",
    "saturation",
    "settings_dict",
    "window_scores",
]
