"""`quantize()`: the FAIR-Calib pipeline on a model in memory.

Stage I (position prior) -> Stage II (block-wise calibration) -> swap in FairLinear layers.
This module unpacks `FairCalibConfig` into plain arguments for the math below it (`ops`, `calib`,
`scoring`, `nn`), which never see the config.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import FairCalibConfig, Rounding, Transform
from .convert import (
    LayerFormat,
    check_group_size,
    check_skip_names,
    linears_to_convert,
    set_module,
)
from .distributed import is_main_process
from .nn import FairLinear

logger = logging.getLogger(__name__)


def layer_format(config: FairCalibConfig) -> LayerFormat:
    return LayerFormat(config.w_bits, config.a_bits, config.group_size, config.transform.value)


def resolve_skip(model: nn.Module, config: FairCalibConfig) -> list[str]:
    """modules_to_not_convert, or transformers' default (LM head, tied embeddings)."""
    if config.modules_to_not_convert is not None:
        check_skip_names(model, config.modules_to_not_convert)
        return list(config.modules_to_not_convert)
    from transformers.quantizers.base import get_keys_to_not_convert

    return sorted(get_keys_to_not_convert(model)) if hasattr(model, "all_tied_weights_keys") else []


def quantize(model: nn.Module, config: FairCalibConfig, texts=None, tokenizer=None) -> nn.Module:
    """Quantize `model` in place with FAIR-Calib and return it.

    The model's full-precision weights are the teacher: Stage I rolls it out to build the position
    prior, Stage II calibrates its blocks one at a time against its own hidden states.

    Args:
        model: a transformers model (LLaDA, Dream, or a Llama-like model for the weight-only parts).
        config: the `FairCalibConfig`.
        texts: calibration text (a list of strings, a `datasets.Dataset` or a dataset name);
            defaults to `config.dataset`. Unused by round-to-nearest without transforms.
        tokenizer: tokenizer (or its path) for `texts`; defaults to `config.tokenizer`, then to
            the model's own directory.
    """
    if not isinstance(config, FairCalibConfig):
        raise ValueError(f"config must be a FairCalibConfig, got {type(config).__name__}")
    if config.push_to_hub:  # no token or a bad repo id: fail before calibrating
        from .hub import require_token

        require_token(repo_id=config.push_to_hub)
    skip = resolve_skip(model, config)
    linears = linears_to_convert(model, skip)
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer to convert (skipped: {skip})")
    check_group_size(linears, config.group_size)
    if config.rounding is Rounding.RTN and config.transform is Transform.NONE:
        _convert_rtn(model, linears, layer_format(config))
    else:
        from .run import run_calibration

        run_calibration(model, config, skip, texts if texts is not None else config.dataset,
                        tokenizer if tokenizer is not None else config.tokenizer)
        rest = linears_to_convert(model, skip)  # linears outside the decoder blocks
        if rest:
            logger.info("round-to-nearest for %d linears outside the blocks: %s", len(rest), list(rest)[:4])
            _convert_rtn(model, rest, layer_format(config))
    _mark_quantized(model, config, skip)
    from .hub import attach_hub_methods, push_model

    tokenizer = tokenizer if tokenizer is not None else config.tokenizer
    attach_hub_methods(model, tokenizer)  # save_pretrained / push_to_hub also write the prior and card
    if config.push_to_hub and is_main_process():  # data parallel: every rank holds this model, one pushes
        push_model(model, config.push_to_hub, tokenizer, keep_on_failure=True)
    return model


@torch.no_grad()
def _convert_rtn(model: nn.Module, linears: dict[str, nn.Linear], fmt: LayerFormat) -> None:
    """Round-to-nearest: each linear is replaced independently, no data needed."""
    for name, linear in tqdm(linears.items(), desc="RTN", leave=False):
        fair = FairLinear.from_linear(linear, fmt.w_bits, fmt.a_bits, fmt.group_size)
        set_module(model, name, fair.to(linear.weight.device))


def _mark_quantized(model: nn.Module, config: FairCalibConfig, skip: list[str]) -> None:
    """Record the config on the model so that save_pretrained writes it and reloading skips calibration."""
    if config.modules_to_not_convert is None:
        config.modules_to_not_convert = skip
    if hasattr(model, "config"):
        model.config.quantization_config = config
    if hasattr(model, "is_quantized") or hasattr(model, "config"):
        from .quantizer import FairCalibHfQuantizer

        model.hf_quantizer = FairCalibHfQuantizer(config, pre_quantized=True)
        model.is_quantized = True
        model.quantization_method = config.quant_method

