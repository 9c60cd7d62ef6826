"""Stage I: the position prior w-bar from probe rollouts of the full-precision teacher.

`stage_one` loads a saved prior (checking or re-weighting it) or rolls the teacher out under the random
commit policy (or the serving policy's threshold / factor rule, optionally on the prefix KV cache:
`stage1_policy`, `stage1_cache`) and builds the prior from the rollouts' commit steps and reliabilities
(`scoring.prior`).
Under data parallelism each process rolls out its share of the probe batches and the rollouts are
gathered in probe order, so every process builds the prior one process would.
"""

from __future__ import annotations

import logging

import torch
from safetensors import SafetensorError
from torch import nn
from tqdm.auto import tqdm

from ..arch import get_adapter
from ..config import FairCalibConfig
from ..data import calibration_sequences, load_texts, resolve_tokenizer
from ..devices import computing_in, execution_device
from ..distributed import DataShard, World, batch_seed, get_world
from ..enums import CacheMode
from ..masks import block_diffusion_mask
from ..modeling.kv_cache import ApproximateCache
from ..naming import public_name, source_name
from ..scoring.prior import (
    PositionPrior,
    prior_from_stats,
    probe_rollouts,
    reliability_sum,
    saturation,
    settings_dict,
)
from .plan import DecodeSetup, StageOneSettings, check_token_ids, make_plan, warn_foreign_tokenizer

logger = logging.getLogger(__name__)


def prior_settings(model: nn.Module, s: StageOneSettings, setup: DecodeSetup) -> dict:
    """What a saved prior must agree on to be reused."""
    return settings_dict(
        model_type=getattr(model.config, "model_type", None), seq_len=setup.seq_len, window=setup.window,
        block_length=setup.block_length, steps=setup.steps, logit_shift=setup.logit_shift,
        early_boost=s.early_boost, boost_schedule=s.boost_schedule, reliability=s.reliability,
        reliability_weight=s.reliability_weight, floor=s.floor, frontier_weight=s.frontier_weight,
        stage1_policy=s.policy, stage1_threshold=s.threshold, stage1_factor=s.factor)


# what a prior saved before a setting existed was made with (every earlier prior: the random commit order)
LEGACY_SETTINGS = {"stage1_policy": "random", "stage1_threshold": None, "stage1_factor": None}


def probe_source(dataset, tokenizer, s: StageOneSettings, setup: DecodeSetup, model: nn.Module):
    """The probe sequences (drawn lazily): seed + 1 and overlapping windows, so any text length works;
    checked against the model's vocabulary and mask id."""

    def draw() -> torch.Tensor:
        ids = calibration_sequences(dataset, tokenizer, s.num_probes, setup.seq_len, seed=s.seed + 1,
                                    allow_overlap=True)
        check_token_ids(ids, model, setup.mask_id, "probe windows of the calibration text")
        return ids

    return draw


def build_prior(model: nn.Module, config: FairCalibConfig, tokenizer, texts=None) -> PositionPrior:
    """Stage I alone: the prior `quantize` would build for this model, config and text."""
    plan = make_plan(model, config, execution_device(model), stage_one=True)
    setup = plan.decode
    tok = resolve_tokenizer(tokenizer, model)
    warn_foreign_tokenizer(tok, setup.mask_id)
    dataset = load_texts(texts if texts is not None else plan.texts)
    source = probe_source(dataset, tok, plan.stage_one, setup, model)
    return stage_one(model, plan.stage_one, setup, source, get_world())


def load_prior(folder: str) -> PositionPrior:
    """`PositionPrior.load(folder)`, or ValueError naming the folder and the fix when its files are damaged."""
    try:
        return PositionPrior.load(folder)
    except (ValueError, KeyError, TypeError, OSError, SafetensorError) as err:  # JSONDecodeError is a ValueError
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        if str(folder) in first:
            raise
        raise ValueError(f"prior {folder} cannot be read ({type(err).__name__}: {first}); save it again with "
                         "PositionPrior.save, or leave `prior` unset to build it") from None


def stage_one(model: nn.Module, s: StageOneSettings, setup: DecodeSetup, probe_ids,
              world: World | None = None) -> PositionPrior:
    """Load the saved prior `s.prior` (checking its settings) or build the prior from probe rollouts.

    With several processes each rolls out its share of the probe batches; the rollouts are gathered in
    probe order, so every process builds the same prior as one process would.
    """
    expected = prior_settings(model, s, setup)
    if s.prior:
        prior = load_prior(s.prior)
        prior.settings = {**LEGACY_SETTINGS, **prior.settings}
        if _reweightable(prior, expected):
            logger.info("Stage I: re-weighting the saved rollouts of %s", s.prior)
            return _prior(prior.commit_step, prior.reliability_sum, s, setup, dict(prior.settings, **expected))
        prior.check_compatible(expected, strict=s.strict_prior)
        if prior.seq_len != setup.seq_len:
            raise ValueError(f"prior {s.prior} covers {prior.seq_len} positions, calibration uses {setup.seq_len}")
        logger.info("Stage I: reusing prior %s", s.prior)
        return prior
    prompts = probe_ids()[:, : setup.seq_len - setup.window]  # (P, N - K)
    device = execution_device(model)
    dtype = s.compute_dtype
    block_diffusion = get_adapter(model).block_diffusion

    def logits_fn(x, **kw):
        if block_diffusion:  # block-causal attention over blocks of block_length from position 0
            kw["attention_mask"] = block_diffusion_mask(x.shape[1], setup.block_length, device)
        return model(x.to(device), **kw).logits.float().cpu()

    logger.info("Stage I: teacher forwards in %s", dtype)
    cache = _FloatCache(ApproximateCache(model, "prefix")) if s.cache is CacheMode.PREFIX else None
    with computing_in(model, dtype):
        commit, reliab = sharded_rollouts(logits_fn, prompts, setup, s, world or World(), cache)
    settings = dict(expected, num_probes=int(prompts.shape[0]), model=public_name(source_name(model)) or "",
                    compute_dtype=str(dtype).removeprefix("torch."), stage1_cache=s.cache.value)
    return _prior(commit, reliability_sum(commit, reliab), s, setup, settings)


# prior settings that only weight the rollouts: a saved prior with its rollout statistics is re-weighted
# when it differs from the run in these alone
WEIGHTING_FIELDS = ("early_boost", "boost_schedule", "reliability_weight", "floor", "frontier_weight")


def _reweightable(prior: PositionPrior, expected: dict) -> bool:
    diffs = prior.differences(expected)
    return prior.commit_step is not None and bool(diffs) and set(diffs) <= set(WEIGHTING_FIELDS)


def _prior(commit: torch.Tensor, rel_sum: torch.Tensor, s: StageOneSettings, setup: DecodeSetup,
           settings: dict) -> PositionPrior:
    """The prior of `s`'s weighting from rollout statistics (P, K), with its saturation."""
    kw = dict(seq_len=setup.seq_len, steps=setup.steps, beta=s.early_boost, schedule=s.boost_schedule,
              lambda1=s.lambda1(setup.steps), floor=s.floor, frontier_weight=s.frontier_weight,
              logit_shift=setup.logit_shift)
    prior = prior_from_stats(commit, rel_sum, settings=settings, **kw)
    if commit.shape[0] >= 2:
        prior.settings["saturation"] = saturation(commit, rel_sum, **kw)
        logger.info("Stage I: %d probes, saturation (N/2 vs N) %.4f", commit.shape[0], prior.settings["saturation"])
    return prior


class _FloatCache:
    """A `CachedLogits` whose logits come back as float32, as Stage I's plain forward returns them."""

    def __init__(self, cache: ApproximateCache) -> None:
        self.cache, self.mode = cache, cache.mode

    def refresh(self, x: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        return self.cache.refresh(x, attention_mask).float()

    def window(self, x: torch.Tensor, attention_mask: torch.Tensor | None, start: int, end: int) -> torch.Tensor:
        return self.cache.window(x, attention_mask, start, end).float()


def sharded_rollouts(logits_fn, prompts: torch.Tensor, setup: DecodeSetup, s: StageOneSettings,
                     world: World, cache=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Probe rollouts, batch b (of `s.probe_batch` prompts) on rank b % size, in probe order, under `s.policy`
    (random commits, or the threshold / factor rule) and on `cache` (a prefix `CachedLogits`) when given.

    Batch b draws its random commit order from its own generator (`batch_seed(seed, "probes", b)`), so
    the rollouts do not depend on the number of processes. prompts: (P, N - K).
    Returns commit_step (P, K) and reliability (T, P, K), the same on every rank.
    """
    shard = DataShard(world, prompts.shape[0], s.probe_batch)
    commits, reliabs = [], []
    for start, stop in tqdm(shard.batches, desc="Stage I: probe rollouts", disable=not world.is_main):
        seed = batch_seed(s.seed, "probes", start // shard.batch_size)
        generator = torch.Generator().manual_seed(seed)
        commit, reliab = probe_rollouts(
            logits_fn, prompts[start:stop], setup.window, setup.block_length, setup.steps, setup.mask_id,
            setup.logit_shift, s.reliability, batch_size=stop - start, generator=generator, cache=cache,
            threshold=s.threshold, factor=s.factor)
        commits.append(commit)  # (b, K)
        reliabs.append(reliab)  # (T, b, K)
    K, T = setup.window, setup.steps
    commit = torch.cat(commits) if commits else torch.zeros(0, K, dtype=torch.long)
    reliab = torch.cat(reliabs, dim=1) if reliabs else torch.zeros(T, 0, K)
    return shard.gather(commit, 0, "probe commit steps"), shard.gather(reliab, 1, "probe reliabilities")
