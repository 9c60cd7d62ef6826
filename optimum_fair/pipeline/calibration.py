"""`calibrate()`: the FAIR-Calib pipeline on a model in memory, returning a `CalibrationResult`.

the plan (`plan.make_plan`: every setting resolved once) -> teacher (the model's FP weights) -> Stage I prior
(`stage1`) -> Stage II block loop (`stage2`) -> packed FairLinear layers (`surgery`). Everything that can be
checked (data length, window, mask token, cache) is checked before the first forward pass.

Under `torchrun` / `accelerate launch` (see `distributed.py`) each process rolls out its share of the
probe batches and calibrates on its share of the sample batches; every process ends with the same
prior and the same quantized model as a single process would make. Only rank 0 writes the cache.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator

import torch
from torch import nn

from ..arch import find_adapter
from ..config import FairCalibConfig
from ..data import calibration_sequences, load_texts, resolve_tokenizer
from ..devices import execution_device, model_float_dtype
from ..digests import tensor_digest
from ..distributed import DataShard, World, get_world
from ..masks import block_diffusion_mask
from ..naming import public_name, source_name
from ..scoring.states import decoding_states, noisy_canvases
from .cache import BlockCache, run_fingerprint, settings_digest
from .head import refit_head
from .moe import check_tied, tie_blocks, unfuse_experts
from .plan import Plan, block_groups, check_token_ids, make_plan, warn_foreign_tokenizer
from .result import CalibrationResult
from .stage1 import probe_source, stage_one
from .stage2 import calibrate_blocks, capture_block_inputs, model_forward
from .surgery import check_convertible, check_group_size, convert_rtn, linears_to_convert, log_fallbacks

logger = logging.getLogger(__name__)


def calibrate(model: nn.Module, config: FairCalibConfig, texts=None, tokenizer=None,
              fp_embedding: torch.Tensor | None = None) -> CalibrationResult:
    """Quantize `model` in place (its linears become FairLinears) and return what calibration produced.

    texts: calibration text (a list of strings, a `datasets.Dataset` or a dataset name); default the
    config's `dataset`. tokenizer: an object or a path; default the config's `tokenizer`, then the model's own.
    fp_embedding: the token embedding's float weight where the model's was rounded before calibration (a
    GGUF target): under input_mode "corrected" the FP stream starts from it, so block 0 also corrects
    towards the float embedding's outputs.
    Every setting is resolved once, by `plan.make_plan`, before any work.
    """
    if not isinstance(config, FairCalibConfig):
        raise ValueError(f"config must be a FairCalibConfig, got {type(config).__name__}")
    adapter = find_adapter(model)
    if adapter is not None:  # before anything is planned: the tying checked, fused experts as linears
        check_tied(model, adapter)
        unfuse_experts(model, adapter)
    plan = make_plan(model, config, execution_device(model))
    # only the user's list keeps such weights float: transformers' default skip list names fused expert
    # parameters of some MoE models (DiffusionGemma), which would leave them float unasked
    check_convertible(model, plan.keep_float)
    linears = linears_to_convert(model, plan.skip + plan.tied)  # tied stacks: shared at the end
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer to convert (skipped: {plan.skip})")
    check_group_size(linears, plan.fmt.group_size)
    check_finite_weights(linears)
    log_fallbacks(linears, plan.fmt)
    result = CalibrationResult(plan.run_config, plan.skip, base_model=public_name(source_name(model)))
    if plan.calibrate:
        texts = texts if texts is not None else plan.texts
        tokenizer = tokenizer if tokenizer is not None else plan.tokenizer
        result.prior, result.blocks = _stages(model, plan, texts, tokenizer, fp_embedding)
    rest = linears_to_convert(model, plan.skip + plan.tied)  # everything with RTN, or the linears outside the blocks
    if rest:
        logger.info("round-to-nearest for %d linears: %s", len(rest), list(rest)[:4])
        convert_rtn(model, rest, plan.fmt)
    if adapter is not None and tie_blocks(model, adapter):
        logger.info("%s now holds the packed modules of %s", adapter.tied_blocks, adapter.blocks)
    return result


def _stages(model: nn.Module, plan: Plan, texts, tokenizer, fp_embedding: torch.Tensor | None = None):
    """Stage I + Stage II on `model` in place; returns (prior or None, per-block records)."""
    adapter, setup, s = plan.adapter, plan.decode, plan.stage_two
    blocks = adapter.block_list(model)
    groups_of = functools.partial(block_groups, adapter, skip=plan.skip)
    tok = resolve_tokenizer(tokenizer, model)
    warn_foreign_tokenizer(tok, setup.mask_id)
    dataset = load_texts(texts)
    ids = calibration_sequences(dataset, tok, plan.num_samples, setup.seq_len, seed=plan.seed)
    check_token_ids(ids, model, setup.mask_id if plan.masked_inputs else -1, "calibration windows")
    world = get_world()
    check_same_run(world, plan, ids)
    shard = DataShard(world, ids.shape[0], s.batch_size)
    if len(shard.batches) == 0:
        n_batches = -(-ids.shape[0] // s.batch_size)
        raise ValueError(f"num_samples={ids.shape[0]} makes {n_batches} batches of {s.batch_size}, "
                         f"fewer than the {world.size} processes: raise num_samples")
    cache = make_cache(model, plan, ids, world) if plan.cache_dir else None  # before Stage I
    prior = weights = None
    if plan.fair:
        prior = stage_one(model, plan.stage_one, setup, probe_source(dataset, tok, plan.stage_one, setup, model),
                          world)
        weights = prior.weights
    if plan.masked_inputs:  # (n, seq) decode states and their (n, seq) weights
        generator = torch.Generator().manual_seed(plan.seed + 1)
        ids, weights = decoding_states(ids, setup.window, setup.block_length, setup.steps, setup.mask_id,
                                       generator, weights, plan.stage_one.floor)
    mask = block_diffusion_mask(ids.shape[1], setup.block_length) if adapter.block_diffusion else None
    inputs = None
    if adapter.canvas:  # noisy canvases of the text after one shared prompt token (one encoder cache for all)
        ids = noisy_canvases(ids, model.get_input_embeddings().num_embeddings,
                             torch.Generator().manual_seed(plan.seed + 2))
        prompt = torch.tensor([[tok.bos_token_id if tok.bos_token_id is not None else int(ids[0, 0])]])
        inputs = functools.partial(_canvas_inputs, prompt)
    hidden, extras = capture_block_inputs(model, blocks, ids[shard.sample_ids], s.batch_size, mask,
                                          inputs=inputs, keep_cache=adapter.canvas)
    if not world.agree(bool(torch.isfinite(hidden).all()), "finite inputs of the first block"):
        raise ValueError("non-finite activations at the input of the first block: check the model's weights")
    logger.info("Stage II: block forwards in %s", s.compute_dtype)
    fp_hidden = None
    if s.corrected and fp_embedding is not None:  # the FP stream from the float embedding
        with _embedding_weight(model, fp_embedding):
            fp_hidden, _ = capture_block_inputs(model, blocks, ids[shard.sample_ids], s.batch_size, mask,
                                                inputs=inputs, keep_cache=adapter.canvas)
    streams = {} if s.corrected else None
    records = calibrate_blocks(blocks, groups_of, hidden, extras, weights, s, model_float_dtype(model),
                               execution_device(model), cache=cache, shard=shard, streams=streams,
                               fp_hidden=fp_hidden)
    if s.corrected:  # the float head refitted to the quantized body, through the model's own tail
        local = weights if weights is None or weights.dim() == 1 else weights[shard.sample_ids]
        refit_head(model, blocks[-1], model_forward(model, mask, inputs), streams, local, shard, s.damp)
    return prior, records


@contextlib.contextmanager
def _embedding_weight(model: nn.Module, weight: torch.Tensor) -> Iterator[None]:
    """The token embedding's weight replaced by `weight` (same shape) for the block; put back after."""
    embedding = model.get_input_embeddings().weight
    if weight.shape != embedding.shape:
        raise ValueError(f"fp_embedding has shape {tuple(weight.shape)}, the model's embedding "
                         f"{tuple(embedding.shape)}")
    kept = embedding.detach().clone()
    with torch.no_grad():
        embedding.copy_(weight)
    try:
        yield
    finally:
        with torch.no_grad():
            embedding.copy_(kept)


def check_finite_weights(linears: dict[str, nn.Module]) -> None:
    """ValueError naming the layers whose weight holds NaN or inf, before any work: RTN would pack NaN scales
    that only a reload refuses, GPTQ / FlatQuant fail later naming no layer (weights offloaded to the meta
    device are not checked here)."""
    bad = [name for name, m in linears.items()
           if m.weight.device.type != "meta" and not bool(torch.isfinite(m.weight).all())]
    if bad:
        raise ValueError(f"{len(bad)} layer(s) to quantize hold NaN or inf weights: {bad[:4]}"
                         f"{' ...' if len(bad) > 4 else ''}; the model's weights are damaged (fix or reload them)")


def check_same_run(world: World, plan: Plan, ids: torch.Tensor) -> None:
    """Every rank has the same settings and calibration windows, compared before any work is split (a rank
    with other num_samples would otherwise fail later with a shape mismatch, naming nothing)."""
    settings = {"num_samples": plan.num_samples, "batch_size": plan.stage_two.batch_size, "seq_len": ids.shape[1],
                "seed": plan.seed, "config digest": settings_digest(plan.settings),
                "calibration windows digest": int(tensor_digest(ids)[:15], 16)}
    world.check_settings(settings, "the run's settings and calibration windows")


def make_cache(model: nn.Module, plan: Plan, ids: torch.Tensor, world: World) -> BlockCache:
    """The block cache; rank 0 writes (or checks) its manifest before the other ranks read it."""

    def make() -> BlockCache:
        n_layers = len(plan.adapter.block_list(model)) if plan.adapter is not None else 1
        return BlockCache(plan.cache_dir, run_fingerprint(model, plan, ids), plan.fmt,
                          lambda index, linears: plan.stage_two.formats(index, n_layers, linears))

    cache = make() if world.is_main else None
    world.barrier("cache manifest written by rank 0")
    return cache if cache is not None else make()


def _canvas_inputs(prompt: torch.Tensor, canvas: torch.Tensor) -> dict:
    """A canvas family's forward arguments: the prompt (1, p) for every row, the canvases (b, seq)."""
    return {"input_ids": prompt.expand(canvas.shape[0], -1), "decoder_input_ids": canvas}
