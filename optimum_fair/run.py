"""One calibration run: resolve data and settings, Stage I (prior), Stage II (blocks).

Everything that can be checked (data length, window, mask token, cache) is checked before the first
forward pass.

Under `torchrun` / `accelerate launch` (see `distributed.py`) each process rolls out its share of the
probe batches and calibrates on its share of the sample batches; every process ends with the same
prior and the same quantized model as a single process would make. Only rank 0 writes the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .cache import BlockCache, tensor_digest
from .calibrate import StageTwoSettings, calibrate_blocks, capture_block_inputs, execution_device
from .config import CalibInputs, FairCalibConfig, Weighting
from .convert import float_dtype, matches
from .distributed import DataShard, World, batch_seed, get_world
from .models import ModelAdapter, get_adapter
from .scoring.prior import (
    PositionPrior,
    prior_from_stats,
    probe_rollouts,
    reliability_sum,
    saturation,
    settings_dict,
)
from .scoring.states import decoding_states

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecodeSetup:
    """Stage I's decode settings, resolved against the model."""

    seq_len: int
    window: int
    block_length: int
    steps: int
    mask_id: int
    logit_shift: int


def resolve_setup(model: nn.Module, adapter: ModelAdapter, config: FairCalibConfig) -> DecodeSetup:
    seq_len = config.resolved_seq_len(adapter.max_length(model.config))
    window = config.resolved_window(seq_len)
    if window > seq_len - 1:
        raise ValueError(f"window ({window}) must leave at least one prompt token in seq_len ({seq_len})")
    if window % config.block_length:
        raise ValueError(f"window ({window}) must be a multiple of block_length ({config.block_length})")
    steps = config.steps or window
    if steps % (window // config.block_length):
        raise ValueError(f"steps ({steps}) must be a multiple of window // block_length")
    needs_mask = config.weighting is Weighting.FAIR or config.calib_inputs is CalibInputs.MASKED
    mask_id = adapter.resolve_mask_token_id(model.config) if needs_mask else -1
    return DecodeSetup(seq_len, window, config.block_length, steps, mask_id, adapter.logit_shift)


def resolve_tokenizer(tokenizer, model: nn.Module):
    """A tokenizer object from an object, a path, or the model's own directory."""
    if tokenizer is not None and not isinstance(tokenizer, str):
        return tokenizer
    path = tokenizer or getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
    if not path:
        raise ValueError("calibration needs a tokenizer: pass tokenizer= or FairCalibConfig(tokenizer=...)")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ValueError(f"could not load a tokenizer from {path!r}: {err}") from None


def block_groups(adapter: ModelAdapter, skip: list[str]) -> tuple[tuple[str, ...], ...]:
    """The adapter's linear groups without the names `modules_to_not_convert` keeps in float."""
    probe = f"{adapter.blocks}.0."
    groups = tuple(tuple(n for n in g if not matches(probe + n, skip)) for g in adapter.groups)
    return tuple(g for g in groups if g)


def run_calibration(model: nn.Module, config: FairCalibConfig, skip: list[str], texts, tokenizer) -> None:
    """Stage I + Stage II on `model` in place (its block linears become FairLinears)."""
    from .data import calibration_sequences, load_texts

    adapter = get_adapter(model)
    blocks = adapter.block_list(model)
    groups = block_groups(adapter, skip)
    setup = resolve_setup(model, adapter, config)
    tok = resolve_tokenizer(tokenizer, model)
    dataset = load_texts(texts)
    ids = calibration_sequences(dataset, tok, config.num_samples, setup.seq_len, seed=config.seed)
    world = get_world()
    shard = DataShard(world, ids.shape[0], config.batch_size)
    if len(shard.batches) == 0:
        n_batches = -(-ids.shape[0] // config.batch_size)
        raise ValueError(f"num_samples={ids.shape[0]} makes {n_batches} batches of {config.batch_size}, "
                         f"fewer than the {world.size} processes: raise num_samples")
    cache = make_cache(model, config, ids, groups, world) if config.cache_dir else None  # before Stage I
    weights = None
    if config.weighting is Weighting.FAIR:
        prior = stage_one(model, config, setup, probe_source(dataset, tok, config, setup), world)
        model.fair_prior = prior
        weights = prior.weights
    if config.calib_inputs is CalibInputs.MASKED:  # (n, seq) decode states and their (n, seq) weights
        generator = torch.Generator().manual_seed(config.seed + 1)
        ids, weights = decoding_states(ids, setup.window, setup.block_length, setup.steps, setup.mask_id,
                                       generator, weights, config.floor)
    settings = StageTwoSettings(
        config.w_bits, config.a_bits, config.group_size, config.rounding.value, config.transform.value,
        config.epochs, config.lr, config.clip_lr, config.batch_size, config.damp, config.act_order,
        config.input_mode.value, config.seed)
    device = execution_device(model)
    hidden, extras = capture_block_inputs(model, blocks, ids[shard.sample_ids], config.batch_size)
    if not world.agree(bool(torch.isfinite(hidden).all()), "finite inputs of the first block"):
        raise ValueError("non-finite activations at the input of the first block: check the model's weights")
    records = calibrate_blocks(blocks, groups, hidden, extras, weights, settings, float_dtype(model), device,
                               cache=cache, shard=shard)
    model.fair_calibration_log = records


def make_cache(model: nn.Module, config: FairCalibConfig, ids: torch.Tensor, groups,
               world: World) -> BlockCache:
    """The block cache; rank 0 writes (or checks) its manifest before the other ranks read it."""
    from .pipeline import layer_format

    def make() -> BlockCache:
        return BlockCache(config.cache_dir, run_fingerprint(model, config, ids), layer_format(config),
                          [n for g in groups for n in g])

    cache = make() if world.is_main else None
    world.barrier("cache manifest written by rank 0")
    return cache if cache is not None else make()


def prior_settings(model: nn.Module, config: FairCalibConfig, setup: DecodeSetup) -> dict:
    """What a saved prior must agree on to be reused."""
    return settings_dict(
        model_type=getattr(model.config, "model_type", None), seq_len=setup.seq_len, window=setup.window,
        block_length=setup.block_length, steps=setup.steps, logit_shift=setup.logit_shift,
        early_boost=config.early_boost, boost_schedule=config.boost_schedule, reliability=config.reliability,
        reliability_weight=config.reliability_weight, floor=config.floor, frontier_weight=config.frontier_weight)


@torch.no_grad()
def probe_source(dataset, tokenizer, config: FairCalibConfig, setup: DecodeSetup):
    """The probe sequences (drawn lazily): seed + 1 and overlapping windows, so any text length works."""
    from .data import calibration_sequences

    return lambda: calibration_sequences(dataset, tokenizer, config.num_probes, setup.seq_len,
                                         seed=config.seed + 1, allow_overlap=True)


def build_prior(model: nn.Module, config: FairCalibConfig, tokenizer, texts=None) -> PositionPrior:
    """Stage I alone: the prior `quantize` would build for this model, config and text."""
    from .data import load_texts

    setup = resolve_setup(model, get_adapter(model), config)
    tok = resolve_tokenizer(tokenizer, model)
    dataset = load_texts(texts if texts is not None else config.dataset)
    return stage_one(model, config, setup, probe_source(dataset, tok, config, setup), get_world())


def stage_one(model: nn.Module, config: FairCalibConfig, setup: DecodeSetup, probe_ids,
              world: World | None = None) -> PositionPrior:
    """Load `config.prior` (checking its settings) or build the prior from probe rollouts.

    With several processes each rolls out its share of the probe batches; the rollouts are gathered in
    probe order, so every process builds the same prior as one process would.
    """
    expected = prior_settings(model, config, setup)
    if config.prior:
        prior = PositionPrior.load(config.prior)
        if _reweightable(prior, expected):
            logger.info("Stage I: re-weighting the saved rollouts of %s", config.prior)
            return _prior(prior.commit_step, prior.reliability_sum, config, setup,
                          dict(prior.settings, **expected))
        prior.check_compatible(expected, strict=config.strict_prior)
        if prior.seq_len != setup.seq_len:
            raise ValueError(f"prior {config.prior} covers {prior.seq_len} positions, calibration uses {setup.seq_len}")
        logger.info("Stage I: reusing prior %s", config.prior)
        return prior
    prompts = probe_ids()[:, : setup.seq_len - setup.window]  # (P, N - K)
    device = execution_device(model)

    def logits_fn(x, **kw):
        return model(x.to(device), **kw).logits.float().cpu()

    commit, reliab = sharded_rollouts(logits_fn, prompts, setup, config, world or World())
    settings = dict(expected, num_probes=int(prompts.shape[0]), model=str(getattr(model, "name_or_path", "") or ""))
    return _prior(commit, reliability_sum(commit, reliab), config, setup, settings)


# prior settings that only weight the rollouts: a saved prior with its rollout statistics is re-weighted
# when it differs from the run in these alone
WEIGHTING_FIELDS = ("early_boost", "boost_schedule", "reliability_weight", "floor", "frontier_weight")


def _reweightable(prior: PositionPrior, expected: dict) -> bool:
    diffs = prior.differences(expected)
    return prior.commit_step is not None and bool(diffs) and set(diffs) <= set(WEIGHTING_FIELDS)


def _prior(commit: torch.Tensor, rel_sum: torch.Tensor, config: FairCalibConfig, setup: DecodeSetup,
           settings: dict) -> PositionPrior:
    """The prior of `config`'s weighting from rollout statistics (P, K), with its saturation."""
    lambda1 = config.reliability_weight if config.reliability_weight is not None else 1.0 / setup.steps
    kw = dict(seq_len=setup.seq_len, steps=setup.steps, beta=config.early_boost,
              schedule=config.boost_schedule.value, lambda1=lambda1, floor=config.floor,
              frontier_weight=config.frontier_weight, logit_shift=setup.logit_shift)
    prior = prior_from_stats(commit, rel_sum, settings=settings, **kw)
    if commit.shape[0] >= 2:
        prior.settings["saturation"] = saturation(commit, rel_sum, **kw)
        logger.info("Stage I: %d probes, saturation (N/2 vs N) %.4f", commit.shape[0], prior.settings["saturation"])
    return prior


def sharded_rollouts(logits_fn, prompts: torch.Tensor, setup: DecodeSetup, config: FairCalibConfig,
                     world: World) -> tuple[torch.Tensor, torch.Tensor]:
    """Probe rollouts, batch b (of max(batch_size, 16) prompts) on rank b % size, in probe order.

    Batch b draws its random commit order from its own generator (`batch_seed(seed, "probes", b)`), so
    the rollouts do not depend on the number of processes. prompts: (P, N - K).
    Returns commit_step (P, K) and reliability (T, P, K), the same on every rank.
    """
    shard = DataShard(world, prompts.shape[0], max(config.batch_size, 16))
    commits, reliabs = [], []
    for start, stop in tqdm(shard.batches, desc="Stage I: probe rollouts", disable=not world.is_main):
        seed = batch_seed(config.seed, "probes", start // shard.batch_size)
        generator = torch.Generator().manual_seed(seed)
        commit, reliab = probe_rollouts(
            logits_fn, prompts[start:stop], setup.window, setup.block_length, setup.steps, setup.mask_id,
            setup.logit_shift, config.reliability.value, batch_size=stop - start, generator=generator)
        commits.append(commit)  # (b, K)
        reliabs.append(reliab)  # (T, b, K)
    K, T = setup.window, setup.steps
    commit = torch.cat(commits) if commits else torch.zeros(0, K, dtype=torch.long)
    reliab = torch.cat(reliabs, dim=1) if reliabs else torch.zeros(T, 0, K)
    return shard.gather(commit, 0, "probe commit steps"), shard.gather(reliab, 1, "probe reliabilities")


def run_fingerprint(model: nn.Module, config: FairCalibConfig, ids: torch.Tensor) -> dict:
    """What must match for a cached block to be reused (the prior follows from these, or from its file)."""
    cfg = {k: v for k, v in config.to_dict().items() if k not in ("push_to_hub", "cache_dir", "tokenizer")}
    model_cfg = {k: v for k, v in model.config.to_dict().items() if k not in ("quantization_config",)}
    first = next(p for p in model.parameters())
    return {
        "config": hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16],
        "model": hashlib.sha256(json.dumps(model_cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]
        + "-" + tensor_digest(first.float()[:8]),
        "data": tensor_digest(ids),
        "prior": _file_digest(config.prior) if config.prior else "computed",
    }


def _file_digest(prior_dir: str) -> str:
    from pathlib import Path

    path = Path(prior_dir) / "prior.safetensors"
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else "missing"
