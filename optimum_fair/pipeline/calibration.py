"""`calibrate()`: the FAIR-Calib pipeline on a model in memory, returning a `CalibrationResult`.

teacher (the model's FP weights) -> Stage I prior (`stage1`) -> Stage II block loop (`stage2`) ->
packed FairLinear layers (`surgery`). Everything that can be checked (data length, window, mask token,
cache) is checked before the first forward pass.

Under `torchrun` / `accelerate launch` (see `distributed.py`) each process rolls out its share of the
probe batches and calibrates on its share of the sample batches; every process ends with the same
prior and the same quantized model as a single process would make. Only rank 0 writes the cache.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import torch
from torch import nn

from ..arch import ModelAdapter, find_adapter, get_adapter
from ..config import FairCalibConfig
from ..data import calibration_sequences, load_texts, resolve_tokenizer
from ..devices import execution_device, model_float_dtype
from ..digests import tensor_digest
from ..distributed import DataShard, World, get_world
from ..enums import CalibInputs, Weighting
from ..naming import public_name, source_name
from ..scoring.forward import block_diffusion_mask
from ..scoring.states import decoding_states, noisy_canvases
from .cache import BlockCache, run_fingerprint, run_fingerprint_config
from .moe import check_tied, tie_blocks, unfuse_experts
from .plan import (
    block_groups,
    check_token_ids,
    decode_setup,
    float_by_design,
    layer_format,
    needs_calibration,
    resolve_skip,
    stage_two_settings,
    warn_foreign_tokenizer,
)
from .result import CalibrationResult
from .stage1 import probe_source, stage_one
from .stage2 import calibrate_blocks, capture_block_inputs
from .surgery import check_convertible, check_group_size, convert_rtn, linears_to_convert

logger = logging.getLogger(__name__)


def calibrate(model: nn.Module, config: FairCalibConfig, texts=None, tokenizer=None) -> CalibrationResult:
    """Quantize `model` in place (its linears become FairLinears) and return what calibration produced.

    texts: calibration text (a list of strings, a `datasets.Dataset` or a dataset name); default
    `config.dataset`. tokenizer: an object or a path; default `config.tokenizer`, then the model's own.
    """
    if not isinstance(config, FairCalibConfig):
        raise ValueError(f"config must be a FairCalibConfig, got {type(config).__name__}")
    adapter, config = _prepare(model, config)
    skip = resolve_skip(model, config)
    tied = [adapter.tied_blocks] if adapter is not None and adapter.tied_blocks else []  # shared at the end
    # only the user's list keeps such weights float: transformers' default skip list names fused expert
    # parameters of some MoE models (DiffusionGemma), which would leave them float unasked
    user = config.modules_to_not_convert
    check_convertible(model, (list(user) if user is not None else float_by_design(adapter)) + tied)
    linears = linears_to_convert(model, skip + tied)
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer to convert (skipped: {skip})")
    check_group_size(linears, config.group_size)
    check_finite_weights(linears)
    run_config = dataclasses.replace(config, modules_to_not_convert=skip)
    result = CalibrationResult(run_config, skip, base_model=public_name(source_name(model)))
    if needs_calibration(config):
        texts = texts if texts is not None else config.dataset
        tokenizer = tokenizer if tokenizer is not None else config.tokenizer
        result.prior, result.blocks = _stages(model, config, skip, texts, tokenizer)
    rest = linears_to_convert(model, skip + tied)  # everything with RTN, or the linears outside the blocks
    if rest:
        logger.info("round-to-nearest for %d linears: %s", len(rest), list(rest)[:4])
        convert_rtn(model, rest, layer_format(config))
    if adapter is not None and tie_blocks(model, adapter):
        logger.info("%s now holds the packed modules of %s", adapter.tied_blocks, adapter.blocks)
    return result


def _prepare(model: nn.Module, config: FairCalibConfig) -> tuple[ModelAdapter | None, FairCalibConfig]:
    """Before anything is quantized: the tying checked, fused experts as linears; a canvas family's
    weighting made uniform (saying why). Returns the adapter and the config the run uses."""
    adapter = find_adapter(model)
    if adapter is None:
        return None, config
    if adapter.canvas and config.calib_inputs is CalibInputs.MASKED:
        raise ValueError(f"calib_inputs='masked' needs masked decoding states; {adapter.name} denoises a canvas of "
                         "random tokens: use calib_inputs='text' (fed as noisy canvases)")
    check_tied(model, adapter)
    unfuse_experts(model, adapter)
    if adapter.canvas and config.weighting is Weighting.FAIR:
        logger.warning("%s starts from uniformly random tokens, not masks: there is no masked commit order for "
                       "Stage I's frontier prior, so this run calibrates with weighting='uniform'", adapter.name)
        config = dataclasses.replace(config, weighting=Weighting.UNIFORM)
    return adapter, config


def _stages(model: nn.Module, config: FairCalibConfig, skip: list[str], texts, tokenizer):
    """Stage I + Stage II on `model` in place; returns (prior or None, per-block records)."""
    adapter = get_adapter(model)
    blocks = adapter.block_list(model)
    groups_of = functools.partial(block_groups, adapter, skip=skip)
    setup = decode_setup(model, adapter, config)
    tok = resolve_tokenizer(tokenizer, model)
    warn_foreign_tokenizer(tok, setup.mask_id)
    dataset = load_texts(texts)
    ids = calibration_sequences(dataset, tok, config.num_samples, setup.seq_len, seed=config.seed)
    masked = setup.mask_id if config.calib_inputs is CalibInputs.MASKED else -1
    check_token_ids(ids, model, masked, "calibration windows")
    world = get_world()
    check_same_run(world, config, ids)
    shard = DataShard(world, ids.shape[0], config.batch_size)
    if len(shard.batches) == 0:
        n_batches = -(-ids.shape[0] // config.batch_size)
        raise ValueError(f"num_samples={ids.shape[0]} makes {n_batches} batches of {config.batch_size}, "
                         f"fewer than the {world.size} processes: raise num_samples")
    cache = make_cache(model, config, ids, world) if config.cache_dir else None  # before Stage I
    prior = weights = None
    if config.weighting is Weighting.FAIR:
        prior = stage_one(model, config, setup, probe_source(dataset, tok, config, setup, model), world)
        weights = prior.weights
    if config.calib_inputs is CalibInputs.MASKED:  # (n, seq) decode states and their (n, seq) weights
        generator = torch.Generator().manual_seed(config.seed + 1)
        ids, weights = decoding_states(ids, setup.window, setup.block_length, setup.steps, setup.mask_id,
                                       generator, weights, config.floor)
    mask = block_diffusion_mask(ids.shape[1], setup.block_length) if adapter.block_diffusion else None
    inputs = None
    if adapter.canvas:  # noisy canvases of the text after one shared prompt token (one encoder cache for all)
        ids = noisy_canvases(ids, model.get_input_embeddings().num_embeddings,
                             torch.Generator().manual_seed(config.seed + 2))
        prompt = torch.tensor([[tok.bos_token_id if tok.bos_token_id is not None else int(ids[0, 0])]])
        inputs = functools.partial(_canvas_inputs, prompt)
    hidden, extras = capture_block_inputs(model, blocks, ids[shard.sample_ids], config.batch_size, mask,
                                          inputs=inputs, keep_cache=adapter.canvas)
    if not world.agree(bool(torch.isfinite(hidden).all()), "finite inputs of the first block"):
        raise ValueError("non-finite activations at the input of the first block: check the model's weights")
    device = execution_device(model)
    settings = stage_two_settings(config, device)
    logger.info("Stage II: block forwards in %s", settings.compute_dtype)
    records = calibrate_blocks(blocks, groups_of, hidden, extras, weights, settings, model_float_dtype(model),
                               device, cache=cache, shard=shard)
    return prior, records


def check_finite_weights(linears: dict[str, nn.Module]) -> None:
    """ValueError naming the layers whose weight holds NaN or inf, before any work: RTN would pack NaN scales
    that only a reload refuses, GPTQ / FlatQuant fail later naming no layer (weights offloaded to the meta
    device are not checked here)."""
    bad = [name for name, m in linears.items()
           if m.weight.device.type != "meta" and not bool(torch.isfinite(m.weight).all())]
    if bad:
        raise ValueError(f"{len(bad)} layer(s) to quantize hold NaN or inf weights: {bad[:4]}"
                         f"{' ...' if len(bad) > 4 else ''}; the model's weights are damaged (fix or reload them)")


def check_same_run(world: World, config: FairCalibConfig, ids: torch.Tensor) -> None:
    """Every rank has the same settings and calibration windows, compared before any work is split (a rank
    with other num_samples would otherwise fail later with a shape mismatch, naming nothing)."""
    settings = {"num_samples": config.num_samples, "batch_size": config.batch_size, "seq_len": ids.shape[1],
                "seed": config.seed, "config digest": run_fingerprint_config(config),
                "calibration windows digest": int(tensor_digest(ids)[:15], 16)}
    world.check_settings(settings, "the run's settings and calibration windows")


def make_cache(model: nn.Module, config: FairCalibConfig, ids: torch.Tensor, world: World) -> BlockCache:
    """The block cache; rank 0 writes (or checks) its manifest before the other ranks read it."""

    def make() -> BlockCache:
        return BlockCache(config.cache_dir, run_fingerprint(model, config, ids), layer_format(config))

    cache = make() if world.is_main else None
    world.barrier("cache manifest written by rank 0")
    return cache if cache is not None else make()


def _canvas_inputs(prompt: torch.Tensor, canvas: torch.Tensor) -> dict:
    """A canvas family's forward arguments: the prompt (1, p) for every row, the canvases (b, seq)."""
    return {"input_ids": prompt.expand(canvas.shape[0], -1), "decoder_input_ids": canvas}
