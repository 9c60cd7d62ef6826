"""The plan of one run: `make_plan(model, config, device)` resolves every setting once.

This is the only module of the pipeline that reads `FairCalibConfig`: the stages get a `Plan` (skip list,
tied stacks, the layer format, the decode setup, Stage I and Stage II settings, the compute dtype, whether
to calibrate). The config checks what it can alone (`config.py`); what needs the model (its maximum length,
mask id, module names, family) is checked here, before any forward pass.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.quantizers.base import get_keys_to_not_convert

from ..arch import ModelAdapter, find_adapter, get_adapter
from ..calib.methods import ROUNDINGS, TRANSFORMS
from ..config import FairCalibConfig, check_steps, check_window
from ..devices import resolve_compute_dtype
from ..enums import BoostSchedule, CacheMode, CalibInputs, InputMode, ProbePolicy, Reliability, Rounding, Weighting
from ..modeling.kv_cache import supports_approximate_cache
from .surgery import LayerFormat, check_skip_names, matches

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


@dataclass(frozen=True)
class StageOneSettings:
    """Stage I: the probes, the prior's weighting, a saved prior to reuse."""

    num_probes: int
    probe_batch: int  # prompts rolled out at once: max(batch_size, 16)
    seed: int
    early_boost: float  # beta
    boost_schedule: BoostSchedule
    reliability: Reliability
    reliability_weight: float | None  # lambda_1 as given (None: 1 / steps, see `lambda1`)
    frontier_weight: float
    floor: float  # epsilon, the weight outside the window
    prior: str | None  # a saved prior to reuse (no rollouts)
    strict_prior: bool
    compute_dtype: torch.dtype  # the teacher's forwards
    policy: ProbePolicy = ProbePolicy.RANDOM  # how the rollouts commit
    threshold: float | None = None  # the threshold policy's (None under the others)
    factor: float | None = None  # the factor policy's (None under the others)
    cache: CacheMode = CacheMode.NONE  # NONE or PREFIX: the rollouts' forwards

    def lambda1(self, steps: int) -> float:
        return self.reliability_weight if self.reliability_weight is not None else 1.0 / steps


@dataclass(frozen=True)
class StageTwoSettings:
    """Stage II: the layer format every calibrated linear gets, and how the block loop makes it."""

    fmt: LayerFormat
    rounding: Rounding
    epochs: int
    lr: float
    clip_lr: float
    batch_size: int
    damp: float
    act_order: bool
    input_mode: InputMode
    seed: int
    true_sequential: bool
    loss_samples: int | None
    compute_dtype: torch.dtype  # the blocks' forwards (`devices.resolve_compute_dtype`)
    roles: tuple[tuple[str, str], ...] = ()  # the family's llama.cpp roles of block linears (a GGUF mix's rules)

    @property
    def corrected(self) -> bool:
        """Whether GPTQ rounds towards the FP model's outputs (`InputMode.CORRECTED`): an FP copy of each block,
        the FP stream of every sample and the LM head's refit."""
        return self.input_mode is InputMode.CORRECTED and ROUNDINGS[self.rounding].hessian

    def formats(self, layer: int, n_layers: int, linears: dict[str, nn.Module]) -> dict[str, LayerFormat]:
        """{name in block `layer` of n_layers: its format} (`LayerFormat.at`)."""
        roles = dict(self.roles)
        return {name: self.fmt.at(roles.get(name), layer, n_layers, m.in_features) for name, m in linears.items()}


@dataclass(frozen=True)
class Plan:
    """Every resolved setting of one run (`make_plan`); nothing below reads the config."""

    adapter: ModelAdapter | None
    skip: list[str]  # modules kept in floating point (modules_to_not_convert resolved)
    tied: list[str]  # stacks sharing the calibrated blocks' modules: left alone, tied at the end
    keep_float: list[str]  # weights `check_convertible` lets stay float: the user's list or the float-by-design, + tied
    fmt: LayerFormat
    calibrate: bool  # False: every linear is rounded to nearest on its own, no data
    compute_dtype: torch.dtype  # the forwards of both stages, on the run's device
    fair: bool  # the Stage I prior weights the loss (weighting "fair" after the family's rule)
    masked_inputs: bool  # Stage II reads decode states of the text (calib_inputs "masked")
    texts: Any  # calibration text: a dataset name, a list of strings or a datasets.Dataset
    tokenizer: Any  # an object, a path, or None (the model's own)
    num_samples: int
    seed: int
    cache_dir: str | None
    settings: dict  # the config's settings that shape the quantized model (cache fingerprint, rank check)
    run_config: FairCalibConfig  # the config as run (weighting and skip resolved): what the result records
    stage_one: StageOneSettings
    stage_two: StageTwoSettings
    decode: DecodeSetup | None  # None when the run does not calibrate


def make_plan(model: nn.Module, config: FairCalibConfig, device: torch.device, stage_one: bool = False) -> Plan:
    """The plan of `config` on `model` (its fused experts already unfused), forwards on `device`.

    stage_one: plan Stage I alone (`build_prior`): the decode setup whatever the rounding, and the
    weighting as given.
    """
    adapter = find_adapter(model)
    check_stage_one_decoding(model, adapter, config)
    if not stage_one:
        config = _family_rules(adapter, config)
    skip = resolve_skip(model, config)
    user = config.modules_to_not_convert
    tied = [adapter.tied_blocks] if adapter is not None and adapter.tied_blocks else []
    calibrate = needs_calibration(config)
    fmt, dtype = layer_format(config), resolve_compute_dtype(config.compute_dtype, device)
    return Plan(
        adapter=adapter, skip=skip, tied=tied,
        keep_float=(list(user) if user is not None else float_by_design(adapter)) + tied,
        fmt=fmt, calibrate=calibrate, compute_dtype=dtype, fair=config.weighting is Weighting.FAIR,
        masked_inputs=config.calib_inputs is CalibInputs.MASKED, texts=config.dataset, tokenizer=config.tokenizer,
        num_samples=config.num_samples, seed=config.seed, cache_dir=config.cache_dir, settings=_settings(config),
        run_config=dataclasses.replace(config, modules_to_not_convert=skip),
        stage_one=stage_one_settings(config, dtype),
        stage_two=_stage_two(config, fmt, dtype, adapter.roles if adapter else ()),
        decode=decode_setup(model, adapter or get_adapter(model), config) if calibrate or stage_one else None)


def _family_rules(adapter: ModelAdapter | None, config: FairCalibConfig) -> FairCalibConfig:
    """A canvas family (random tokens, no masks) refuses masked inputs and calibrates with uniform weights
    (saying why); returns the config the run uses."""
    if adapter is None or not adapter.canvas:
        return config
    if config.calib_inputs is CalibInputs.MASKED:
        raise ValueError(f"calib_inputs='masked' needs masked decoding states; {adapter.name} denoises a canvas of "
                         "random tokens: use calib_inputs='text' (fed as noisy canvases)")
    if config.weighting is Weighting.FAIR:
        logger.warning("%s starts from uniformly random tokens, not masks: there is no masked commit order for "
                       "Stage I's frontier prior, so this run calibrates with weighting='uniform'", adapter.name)
        config = dataclasses.replace(config, weighting=Weighting.UNIFORM)
    return config


def check_stage_one_decoding(model: nn.Module, adapter: ModelAdapter | None, config: FairCalibConfig) -> None:
    """Refuse, naming the field, a Stage I policy or cache this model's family cannot run (before any work)."""
    if config.stage1_policy is not ProbePolicy.RANDOM and adapter is not None and adapter.canvas:
        raise ValueError(f"stage1_policy={config.stage1_policy.value!r}: {adapter.name} denoises a canvas of random "
                         "tokens, with no masked commit order to roll out; leave stage1_policy='random'")
    if config.stage1_cache is CacheMode.PREFIX and not supports_approximate_cache(model):
        raise ValueError(f"stage1_cache='prefix': {type(model).__name__} has no approximate KV cache (LLaDA, Dream "
                         "and LLaDA-MoE do); use stage1_cache='none'")


def _settings(config: FairCalibConfig) -> dict:
    """The config's settings that shape the quantized model (not its folders, repo or tokenizer)."""
    return {k: v for k, v in config.to_dict().items() if k not in ("push_to_hub", "cache_dir", "tokenizer")}


def decode_setup(model: nn.Module, adapter: ModelAdapter, config: FairCalibConfig) -> DecodeSetup:
    """Sequence length, window K, blocks, steps T, mask id and logit shift of this run; the config's rules
    (`check_window`, `check_steps`) checked again only where a value came from the model."""
    model_max = adapter.max_length(model.config)
    seq_len = config.resolved_seq_len(model_max)
    window = config.resolved_window(seq_len)
    block = config.resolved_block_length(window)  # divides the window (checked in the config when both are set)
    steps = config.steps or window
    if config.seq_len is None or config.window is None:
        limit = f" (seq_len {seq_len}; the model's maximum length is {model_max})" if model_max else ""
        check_window(window, seq_len, limit)
    if config.window is None:
        check_steps(steps, window, block)
    if adapter.block_diffusion and (seq_len - window) % block:
        raise ValueError(f"{adapter.name} attends in blocks of block_length ({block}) from position 0: the probe "
                         f"prompt seq_len - window = {seq_len - window} must be a multiple of it")
    return DecodeSetup(seq_len, window, block, steps, _mask_id(adapter, model, config), adapter.logit_shift)


def _mask_id(adapter: ModelAdapter, model: nn.Module, config: FairCalibConfig) -> int:
    """The mask id when the run needs masked states (Stage I rollouts or masked inputs), else -1."""
    if config.calib_inputs is CalibInputs.MASKED:
        return adapter.mask_id(model.config)
    if config.weighting is not Weighting.FAIR:
        return -1
    try:
        return adapter.mask_id(model.config)
    except ValueError as err:
        raise ValueError(f"weighting='fair' rolls the teacher out from masked states, and this model cannot: "
                         f"{err}. Use weighting='uniform', or set config.mask_token_id") from None


def stage_one_settings(config: FairCalibConfig, compute_dtype: torch.dtype) -> StageOneSettings:
    """config's Stage I values."""
    return StageOneSettings(
        config.num_probes, max(config.batch_size, 16), config.seed, config.early_boost, config.boost_schedule,
        config.reliability, config.reliability_weight, config.frontier_weight, config.floor, config.prior,
        config.strict_prior, compute_dtype, config.stage1_policy,
        config.stage1_threshold if config.stage1_policy is ProbePolicy.THRESHOLD else None,
        config.stage1_factor if config.stage1_policy is ProbePolicy.FACTOR else None, config.stage1_cache)


def stage_two_settings(config: FairCalibConfig, device: torch.device | None = None) -> StageTwoSettings:
    """config's Stage II values without a model (a run takes `make_plan(...).stage_two`); `compute_dtype`
    resolved for `device` (default CPU)."""
    dtype = resolve_compute_dtype(config.compute_dtype, device or torch.device("cpu"))
    return _stage_two(config, layer_format(config), dtype)


def _stage_two(config: FairCalibConfig, fmt: LayerFormat, compute_dtype: torch.dtype,
               roles: tuple[tuple[str, str], ...] = ()) -> StageTwoSettings:
    return StageTwoSettings(
        fmt, config.rounding, config.epochs, config.lr, config.clip_lr, config.batch_size,
        config.damp, config.act_order, config.input_mode, config.seed, config.true_sequential, config.loss_samples,
        compute_dtype, roles)


def layer_format(config: FairCalibConfig) -> LayerFormat:
    """What every converted linear of this config stores: float16 scales for a GGUF target (its blocks store
    fp16 scales, so the export is exact), else the model's dtype."""
    scale_dtype = torch.float16 if config.gguf_type is not None else None
    return LayerFormat(config.w_bits, config.a_bits, config.group_size, config.transform, config.weight_grid,
                       scale_dtype, mix=config.gguf_type, sym=config.sym)


def needs_calibration(config: FairCalibConfig) -> bool:
    """False only for round-to-nearest without transforms: each linear is then converted on its own."""
    return ROUNDINGS[config.rounding].calibrated or TRANSFORMS[config.transform].calibrated


def resolve_skip(model: nn.Module, config: FairCalibConfig) -> list[str]:
    """modules_to_not_convert as given, or `default_skip` (a router is quantized only when a given list
    leaves it out)."""
    if config.modules_to_not_convert is not None:
        check_skip_names(model, config.modules_to_not_convert)
        return list(config.modules_to_not_convert)
    return default_skip(model, find_adapter(model))


def block_groups(adapter: ModelAdapter, index: int, block: nn.Module, skip: list[str]) -> tuple[tuple[str, ...], ...]:
    """Block `index`'s linear groups (`ModelAdapter.block_groups`) without the names `skip` keeps in float."""
    probe = f"{adapter.blocks}.{index}."
    groups = tuple(tuple(n for n in g if not matches(probe + n, skip)) for g in adapter.block_groups(block))
    return tuple(g for g in groups if g)


def float_by_design(adapter: ModelAdapter | None) -> list[str]:
    """Modules kept in floating point unless the user's own modules_to_not_convert leaves them out: the
    routers of a mixture-of-experts family and the adapter's `float_modules`."""
    if adapter is None:
        return []
    routers = [adapter.experts.router] if adapter.experts is not None else []
    return routers + list(adapter.float_modules or ())


def default_skip(model: nn.Module, adapter: ModelAdapter | None) -> list[str]:
    """The adapter's float modules, else transformers' default (LM head, tied embeddings), plus the
    adapter's routers (kept float)."""
    skip = set()
    if adapter is None or adapter.float_modules is None:
        skip = set(get_keys_to_not_convert(model)) if hasattr(model, "all_tied_weights_keys") else set()
    return sorted(skip | set(float_by_design(adapter)))


def check_token_ids(ids: torch.Tensor, model: nn.Module, mask_id: int, what: str) -> None:
    """ids (n, seq) are ids of the model's vocabulary and, when the run masks (mask_id >= 0), hold no mask
    token; raised before any forward, naming the data."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(embeddings, "num_embeddings", None)
    if vocab is not None:
        bad = (ids < 0) | (ids >= vocab)
        if bool(bad.any()):
            raise ValueError(f"the {what} hold token id {int(ids[bad].max())}, outside the model's vocabulary "
                             f"({vocab} ids): the tokenizer is not this model's; pass the model's own tokenizer")
    if mask_id >= 0 and bool((ids == mask_id).any()):
        row = int((ids == mask_id).any(dim=1).nonzero()[0])
        raise ValueError(f"the {what} contain the mask token id {mask_id} (window {row}): the teacher decodes from "
                         "masked states, so calibration text must not hold the mask token; remove it from the "
                         "texts (or input_ids)")


def warn_foreign_tokenizer(tokenizer, mask_id: int) -> None:
    """Warn when the tokenizer's mask token is not the model's mask id (mask_id -1: the run needs none)."""
    own = getattr(tokenizer, "mask_token_id", None)
    if mask_id >= 0 and isinstance(own, int) and own != mask_id:
        logger.warning("the tokenizer's mask token id is %d, the model's mask id %d: is the tokenizer this "
                       "model's? Calibration text is tokenized with it", own, mask_id)
