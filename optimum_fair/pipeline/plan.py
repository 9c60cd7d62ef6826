"""The plan of one run: `FairCalibConfig` unpacked into plain, typed settings for the stages below.

This is the only module of the pipeline that reads the config field by field for the math: Stage I gets
a `DecodeSetup`, Stage II a `StageTwoSettings`, the module surgery a `LayerFormat`. Everything is
resolved against the model (its maximum length, its mask id, its blocks) before any forward pass.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from transformers.quantizers.base import get_keys_to_not_convert

from ..arch import ModelAdapter, find_adapter
from ..calib.methods import ROUNDINGS, TRANSFORMS
from ..config import FairCalibConfig
from ..devices import resolve_compute_dtype
from ..enums import CalibInputs, InputMode, Rounding, Transform, WeightGrid, Weighting
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
class StageTwoSettings:
    """Plain Stage II values unpacked from FairCalibConfig (its defaults are the only ones)."""

    w_bits: int
    a_bits: int
    group_size: int
    rounding: Rounding
    transform: Transform
    epochs: int
    lr: float
    clip_lr: float
    batch_size: int
    damp: float
    act_order: bool
    input_mode: InputMode
    seed: int
    true_sequential: bool
    weight_grid: WeightGrid
    loss_samples: int | None
    compute_dtype: torch.dtype  # the blocks' forwards (`devices.resolve_compute_dtype`)
    scale_dtype: torch.dtype | None = None  # what the scales are rounded to (None: the model's dtype)


def decode_setup(model: nn.Module, adapter: ModelAdapter, config: FairCalibConfig) -> DecodeSetup:
    """Sequence length, window K, blocks, steps T, mask id and logit shift of this run."""
    model_max = adapter.max_length(model.config)
    seq_len = config.resolved_seq_len(model_max)
    window = config.resolved_window(seq_len)
    limit = f" (seq_len {seq_len}; the model's maximum length is {model_max})" if model_max else ""
    if window > seq_len - 1:
        raise ValueError(f"window ({window}) must leave at least one prompt token in seq_len ({seq_len}){limit}")
    block = config.resolved_block_length(window)
    if window % block:
        raise ValueError(f"window ({window}) must be a multiple of block_length ({block})")
    steps = config.steps or window
    if steps % (window // block):
        raise ValueError(f"steps ({steps}) must be a multiple of window // block_length = {window // block}")
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


def stage_two_settings(config: FairCalibConfig, device: torch.device | None = None) -> StageTwoSettings:
    """config's Stage II values; `compute_dtype` resolved for `device` (default CPU)."""
    return StageTwoSettings(
        config.w_bits, config.a_bits, config.group_size, config.rounding, config.transform, config.epochs,
        config.lr, config.clip_lr, config.batch_size, config.damp, config.act_order, config.input_mode,
        config.seed, config.true_sequential, config.weight_grid, config.loss_samples,
        resolve_compute_dtype(config.compute_dtype, device or torch.device("cpu")), scale_dtype(config))


def layer_format(config: FairCalibConfig) -> LayerFormat:
    """What every converted linear of this config stores."""
    return LayerFormat(config.w_bits, config.a_bits, config.group_size, config.transform, config.weight_grid,
                       scale_dtype(config))


def scale_dtype(config: FairCalibConfig) -> torch.dtype | None:
    """float16 for a GGUF target (its blocks store fp16 scales, so the export is exact), else None (the
    model's dtype)."""
    return torch.float16 if config.gguf_type is not None else None


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
