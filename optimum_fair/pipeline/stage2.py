"""Stage II lifecycle: capture block inputs, then calibrate and swap one decoder block at a time.

The math (weighted loss, GPTQ, transforms) lives in `calib/`; this file owns the order of work:
for block l, h* = FP block(FP stream) is the target, the quantized block reads the quantized stream
(or the FP stream, `input_mode="fp"`), its linears are calibrated group by group in forward order, and
the block's FairLinears replace its nn.Linears. Finished blocks go to `cache_dir` so a killed run
resumes after the last finished block (see `cache.py`). Settings arrive as a `plan.StageTwoSettings` (its
`fmt`: what every calibrated linear stores); the methods' records (`calib.methods`) say what each fits.

Data parallel: with a `DataShard` each process holds the streams of its own batches; the losses, the
absmax and the GPTQ Hessians are reduced across processes (`stats.py`), FlatQuant's gradients are
summed (`fit_transforms`), every process ends each block with the same weights (checked), and only
rank 0 writes the cache.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
from collections.abc import Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.cache_utils import Cache

from ..calib.gptq import drift_target, gptq_factor
from ..calib.methods import ROUNDINGS, TransformMethod
from ..calib.transforms import CalibLinear, TransformParams, fit_transforms, smooth_scale, transform_params
from ..devices import computing_in, execution_device
from ..distributed import DataShard, World
from ..enums import InputMode, Rounding
from ..nn import FairLinear
from ..nn.linear import float_weights_kept
from .cache import state_digest
from .offload import onloaded
from .plan import StageTwoSettings
from .stats import counted_hessians, expert_of, group_drifts, group_input_absmax, module_checksum, stream_loss
from .surgery import round_linear, set_module

logger = logging.getLogger(__name__)

_CACHE_KWARGS = ("past_key_values", "past_key_value", "cache", "use_cache")


# -- block inputs -------------------------------------------------------------------------------
class _InputsRecorded(Exception):
    """Raised by `recording_inputs(..., stop=True)` once the block's inputs are stored: nothing after them
    is needed, so the forward ends there (GPTQ's usual early exit)."""


@contextlib.contextmanager
def recording_inputs(block: nn.Module, store: list, stop: bool = False) -> Iterator[None]:
    """Append (hidden_states, other kwargs, other args) of every call of `block` to `store`; with `stop`
    the call then raises `_InputsRecorded` instead of running the block (callers catch exactly that)."""

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        store.append((hidden.detach(), rest, args[1:]))
        if stop:
            raise _InputsRecorded

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, input_ids: torch.Tensor, batch_size: int,
                         attention_mask: torch.Tensor | None = None, inputs: Callable | None = None,
                         keep_cache: bool = False) -> tuple[torch.Tensor, Callable[..., tuple[tuple, dict]]]:
    """Inputs of blocks[0] for every calibration sequence, and a maker of each block's other arguments.

    input_ids: (n, seq) with no padding, so every sample shares the same positions and attention mask;
    the extra arguments (rotary tables, masks) each block gets for the first batch are re-sliced per batch
    (blocks may get different ones: sliding / full attention layers).
    attention_mask: passed to every model forward (a block-diffusion family's block-causal mask).
    inputs(ids) -> the model's keyword arguments for a batch of ids (default {"input_ids": ids}).
    keep_cache: keep a KV cache argument (a decoder that reads its encoder's cache, the same for every
    sample); otherwise it is dropped.
    Returns hidden (n, seq, d) float32 on CPU and `extras(b, l=0) -> (args, kwargs)` for block l, batch b.
    """
    forward = model_forward(model, attention_mask, inputs)
    per_block: list[list] = [[] for _ in blocks]
    with contextlib.ExitStack() as stack:  # every block's arguments, from one full forward of the first batch
        for block, store in zip(blocks, per_block, strict=True):
            stack.enter_context(recording_inputs(block, store))
        forward(input_ids[:batch_size])
    store: list = []
    starts = range(0, input_ids.shape[0], batch_size)
    with recording_inputs(blocks[0], store, stop=True):  # every batch stops at blocks[0]'s input
        for start in starts:
            with contextlib.suppress(_InputsRecorded):
                forward(input_ids[start:start + batch_size])
    if len(store) != len(starts):
        raise RuntimeError(f"blocks[0] saw {len(store)} of the {len(starts)} calibration batches: the model's "
                           "forward does not reach its first block")
    hidden = torch.cat([h.float().cpu() for h, _, _ in store])  # (n, seq, d)
    b0 = per_block[0][0][0].shape[0]
    # no KV cache unless asked: a cache object (Llama passes it as `cache` in transformers 5) would grow
    # across the calibration batches, so later batches attended to earlier ones and gradients reached old graphs
    captured = [(_keep(rec[0][1], keep_cache), rec[0][2]) for rec in per_block]

    def extras(b: int, l: int = 0) -> tuple[tuple, dict]:
        kwargs0, args0 = captured[l]
        return _rebatch(args0, b0, b), _rebatch(kwargs0, b0, b)

    return hidden, extras


def model_forward(model: nn.Module, attention_mask: torch.Tensor | None = None,
                  inputs: Callable | None = None) -> Callable[[torch.Tensor], None]:
    """forward(ids (b, seq)): `model` run on a batch of calibration ids, as `capture_block_inputs` runs it."""
    device = execution_device(model)
    fixed = {} if attention_mask is None else {"attention_mask": attention_mask.to(device)}

    def forward(ids: torch.Tensor) -> None:
        kwargs = inputs(ids) if inputs is not None else {"input_ids": ids}
        model(**{k: v.to(device) for k, v in kwargs.items()}, **fixed)

    return forward


def _keep(kwargs: dict, keep_cache: bool) -> dict:
    if keep_cache:
        return {k: v for k, v in kwargs.items() if k != "use_cache"}
    return {k: v for k, v in kwargs.items() if k not in _CACHE_KWARGS and not isinstance(v, Cache)}


def _rebatch(value, b0: int, b: int):
    """Re-slice tensors whose leading dim is the capture batch b0 to batch b (samples are identical)."""
    if isinstance(value, Cache):  # a read-only encoder cache: a shallow copy whose layers hold re-sliced tensors
        out = copy.copy(value)
        out.layers = [copy.copy(layer) for layer in value.layers]
        for layer in out.layers:
            layer.keys, layer.values = _rebatch(layer.keys, b0, b), _rebatch(layer.values, b0, b)
        return out
    if torch.is_tensor(value):
        if value.dim() and value.shape[0] == b0 and b0 > 0:
            return value[:1].expand(b, *value.shape[1:])
        return value
    if isinstance(value, tuple):
        return tuple(_rebatch(v, b0, b) for v in value)
    if isinstance(value, list):
        return [_rebatch(v, b0, b) for v in value]
    if isinstance(value, dict):
        return {k: _rebatch(v, b0, b) for k, v in value.items()}
    return value


def block_caller(block: nn.Module, extras: Callable[[int], tuple[tuple, dict]], device,
                 compute_dtype: torch.dtype = torch.float32) -> Callable:
    """x (b, seq, d) -> block output (b, seq, d) float32, with the block's captured extra arguments.

    The block (float32) computes in `compute_dtype` (a narrower one: autocast, so its matrix products run
    in it while its weights stay float32)."""

    def call(x: torch.Tensor) -> torch.Tensor:
        args, kwargs = extras(x.shape[0])
        args, kwargs = _to_device((args, kwargs), device)
        with computing_in(block, compute_dtype):
            out = block(x.to(device), *args, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        return out.float()

    return call


def _to_device(value, device):
    if torch.is_tensor(value):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


@torch.no_grad()
def run_batched(fn: Callable, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """fn over x (n, seq, d) in batches; results float32 on CPU."""
    return torch.cat([fn(x[i:i + batch_size]).cpu() for i in range(0, x.shape[0], batch_size)])


# -- one block --------------------------------------------------------------------------------
def calibrate_block(
    block: nn.Module,
    groups: tuple[tuple[str, ...], ...],
    call: Callable[[torch.Tensor], torch.Tensor],
    x_in: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor | None,
    s: StageTwoSettings,
    generator: torch.Generator,
    dtype: torch.dtype,
    shard: DataShard | None = None,
    layer: int = 0,
    n_layers: int = 1,
    drift: tuple[nn.Module, Callable, torch.Tensor] | None = None,
) -> None:
    """Replace the linears of `block` (float32, on the compute device) by calibrated FairLinears; block
    `layer` of `n_layers` (what a GGUF mix's per-layer rules read).

    drift: (the FP block, its caller, the FP stream of x_in's samples) for `InputMode.CORRECTED`: each
    dense GPTQ group then rounds `gptq.drift_target`, so that its output on x_in matches the FP block's
    on the FP stream.

    x_in, targets (and 2-d weights) hold this process's samples of `shard` (default: all of them).
    """
    shard = shard or DataShard(World(), x_in.shape[0], s.batch_size)
    method, transform = ROUNDINGS[s.rounding], s.fmt.method
    linears = {name: block.get_submodule(name) for group in groups for name in group}
    fmts = s.formats(layer, n_layers, linears)
    params = _make_transforms(block, groups, linears, call, x_in, transform, generator, shard)
    calib = {name: CalibLinear(linears[name], params[gi], fmts[name].w_bits, fmts[name].a_bits,
                               fmts[name].group_size, weight_clip=transform.clips, grid=fmts[name].grid)
             for gi, group in enumerate(groups) for name in group}
    if transform.learned:
        for name, module in calib.items():
            set_module(block, name, module)
        with torch.enable_grad(), _frozen(block):
            history = fit_transforms(call, x_in, targets, weights, list(calib.values()), s.epochs, s.lr,
                                     s.clip_lr, s.batch_size, generator=generator, **_data_parallel(shard))
        logger.info("  learned transforms: loss %.4g -> %.4g over %d epochs", history[0], history[-1],
                    len(history))
    hessians = {}
    # corrected inputs: each group's Hessian and drift with the earlier groups quantized (true-sequential), so
    # a group also undoes its block's earlier rounding (its drift from one pass over the float block would be 0)
    dense = [group[0] for group in groups if drift is not None and not expert_of(block, group[0])]
    if drift is not None and len(dense) < len(groups):
        logger.info("  corrected inputs: %d routed-expert groups rounded on the quantized stream alone",
                    len(groups) - len(dense))
    if method.hessian and not s.true_sequential and drift is None:  # every group's Hessian from one pass
        firsts = [group[0] for group in groups]
        found, counts = counted_hessians(block, firsts, [calib[n] for n in firsts], call, x_in, weights, shard)
        hessians = dict(zip(firsts, zip(found, counts, strict=True), strict=True))
    for group in groups:  # forward order: true-sequential, later groups see earlier ones quantized
        factor, rounding, retargeted = None, s.rounding, {}
        if method.hessian:  # one Hessian and one factorisation per group (q/k/v share them)
            H, count = hessians.pop(group[0], (None, 0))
            if group[0] in dense:  # the FP outputs as targets (H and D of the same inputs, one pass)
                ((H, D),) = group_drifts(block, drift[0], [group[0]], [calib[group[0]]], call, drift[1], x_in,
                                         drift[2], weights, shard)
                retargeted = {n: drift_target(calib[n].transformed_weight(), H, D, s.damp) for n in group}
                del D
            elif H is None:
                (H,), (count,) = counted_hessians(block, [group[0]], [calib[group[0]]], call, x_in, weights, shard)
            if expert_of(block, group[0]) and count < H.shape[0]:  # a rarely routed expert: H is singular
                logger.info("  %s: %d calibration tokens for %d inputs: round-to-nearest", group[0], count,
                            H.shape[0])
                rounding = Rounding.RTN
            else:
                factor = gptq_factor(H, s.damp, s.act_order, overwrite=True)
            del H
        for name in group:
            kwargs = calib[name].export(rounding, factor=factor, scale_dtype=fmts[name].scale_dtype or dtype,
                                        target=retargeted.get(name))
            fair = FairLinear.from_codes(**kwargs, dtype=dtype).to(linears[name].weight.device)
            set_module(block, name, fair)
            del calib[name], linears[name]  # the float weight goes as soon as its codes exist


@contextlib.contextmanager
def _frozen(block: nn.Module) -> Iterator[None]:
    """The block's own parameters (norms) get no gradients while transforms are fitted."""
    own = [p for n, p in block.named_parameters() if p.requires_grad and ".params." not in n
           and not n.endswith("clip_logit")]
    for p in own:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in own:
            p.requires_grad_(True)


def _data_parallel(shard: DataShard) -> dict:
    """fit_transforms' data-parallel arguments for `shard` (none with one process)."""
    if shard.world.size == 1:
        return {}
    return {"all_reduce": lambda t: shard.world.all_reduce_sum(t, "transform gradients"),
            "sample_ids": shard.sample_ids, "num_samples": shard.num_samples}


def _make_transforms(block, groups, linears, call, x_in, method: TransformMethod, generator,
                     shard: DataShard) -> list[TransformParams]:
    """One TransformParams of `method` per group of linears sharing an input."""
    alpha = method.smooth_alpha
    absmax = group_input_absmax(block, groups, call, x_in, shard) if alpha is not None else None
    out = []
    for gi, group in enumerate(groups):
        d = linears[group[0]].in_features
        device = linears[group[0]].weight.device
        smooth = None
        if alpha is not None:  # an expert that no token reached keeps s = 1
            smooth = smooth_scale(absmax[gi], [linears[n].weight for n in group], alpha=alpha) \
                if bool(absmax[gi].any()) else torch.ones(d, device=device)
            smooth = smooth.to(device)
        out.append(transform_params(method, d, generator, device, smooth))
    return out


@torch.no_grad()
def rtn_block_loss(block, groups, extras, device, x_in, targets, weights, s: StageTwoSettings,
                   shard: DataShard, layer: int = 0, n_layers: int = 1) -> float:
    """The block's weighted loss with plain round-to-nearest linears: the 'before calibration' number.

    The RTN linears are swapped in and the float ones put back (no copy of the float block).
    """
    names = [n for group in groups for n in group]
    floats = {name: block.get_submodule(name) for name in names}
    fmts = s.formats(layer, n_layers, floats)
    try:
        for name in names:
            set_module(block, name, round_linear(floats[name], fmts[name]))
        with float_weights_kept(block):
            out = run_batched(block_caller(block, extras, device, s.compute_dtype), x_in, s.batch_size)
    finally:
        for name in names:
            set_module(block, name, floats[name])
    return stream_loss(targets, out, weights, shard)


# -- all blocks ---------------------------------------------------------------------------------
def calibrate_blocks(
    blocks: nn.ModuleList,
    groups_of: Callable[[int, nn.Module], tuple[tuple[str, ...], ...]],
    hidden: torch.Tensor,
    extras: Callable,
    weights: torch.Tensor | None,
    s: StageTwoSettings,
    dtype: torch.dtype,
    device: torch.device,
    cache=None,
    shard: DataShard | None = None,
    streams: dict | None = None,
    fp_hidden: torch.Tensor | None = None,
) -> list[dict]:
    """Calibrate every block in order; returns per-block {'block', 'loss_rtn', 'loss', 'samples'} records
    ('samples': how many samples scored the two losses, `loss_shard`).

    groups_of(l, block): block l's linear groups in forward order (`plan.block_groups`).

    hidden: inputs of blocks[0], (n, seq, d) float32 on CPU; extras(b, l): block l's other arguments for a
    batch of b (`capture_block_inputs`). `cache` (optional) has
    `load(l, block, teacher) -> bool` and `save(l, block, teacher)` (teacher: the FP block's digest); a
    cached block is loaded instead of calibrated.
    shard: with several processes, which samples this one holds (`hidden` has exactly those rows, and
    2-d weights all n rows); the records and the calibrated blocks are the same on every process.
    fp_hidden: the FP model's inputs of blocks[0] where they differ from `hidden` (the quantized model's:
    a GGUF target's rounded embedding), like `hidden`; default `hidden`.
    streams: a dict that receives the last block's outputs, "fp" (the FP model's, the logged samples) and
    "q" (the quantized model's, all of this process's samples).
    """
    shard = shard or DataShard(World(), hidden.shape[0], s.batch_size)
    if shard.batch_size != s.batch_size or hidden.shape[0] != len(shard.sample_ids):
        raise ValueError(f"hidden has {hidden.shape[0]} rows, the shard {len(shard.sample_ids)} "
                         f"(batch size {shard.batch_size}, settings {s.batch_size})")
    if weights is not None and weights.dim() == 2:
        weights = weights[shard.sample_ids]  # (n_local, seq)
    generator = torch.Generator().manual_seed(s.seed)
    logged = loss_shard(shard, s)
    fp_start = hidden if fp_hidden is None else fp_hidden
    fp_stream, q_stream = fp_start[:len(logged.sample_ids)], hidden  # the FP stream: the logged samples only
    records = []
    for l, block in enumerate(tqdm(blocks, desc="Stage II: blocks", disable=not shard.world.is_main)):
        with onloaded(block, device):
            fp_stream, q_stream, record = _one_block(l, block, groups_of(l, block), extras, fp_stream, q_stream,
                                                     weights, s, generator, dtype, device, cache, shard, logged,
                                                     len(blocks))
        records.append(record)
    if streams is not None:
        streams.update(fp=fp_stream, q=q_stream)
    return records


def loss_shard(shard: DataShard, s: StageTwoSettings) -> DataShard:
    """The samples that score the logged losses: the first `loss_samples` when nothing else needs the FP
    targets (GPTQ or fixed transforms on quantized inputs), else all. Its batches are the first batches of
    `shard`, on the same ranks, so each rank's logged rows are a prefix of its rows."""
    if s.loss_samples is None or s.fmt.method.learned or s.input_mode is not InputMode.QUANTIZED:
        return shard
    return DataShard(shard.world, min(s.loss_samples, shard.num_samples), shard.batch_size)


def _one_block(l, block, groups, extras, fp_stream, q_stream, weights, s: StageTwoSettings, generator, dtype,
               device, cache, shard: DataShard, logged: DataShard, n_layers: int = 1
               ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Calibrate block l (float32 weights, forwards in `s.compute_dtype`) on `device`; returns the next FP
    and quantized streams and a record.

    fp_stream holds the `logged` samples (a prefix of this rank's rows), q_stream all of them."""
    block.float()
    extras = functools.partial(extras, l=l)  # block l's own captured arguments
    call = block_caller(block, extras, device, s.compute_dtype)
    targets = run_batched(call, fp_stream, s.batch_size)  # h*_l: (n_logged_local, seq, d)
    x_in = fp_stream if s.input_mode is InputMode.FP else q_stream
    m = targets.shape[0]
    w_log = weights if weights is None or weights.dim() == 1 else weights[:m]
    generator.manual_seed(s.seed + l)  # each block's randomness independent of earlier work
    loss_rtn = rtn_block_loss(block, groups, extras, device, x_in[:m], targets, w_log, s, logged, l, n_layers)
    teacher = state_digest(block.state_dict()) if cache is not None else ""  # the FP block, before any swap
    loaded = cache is not None and cache.load(l, block, teacher)
    if shard.world.agree(loaded, f"block {l}: found in cache_dir (cache_dir must be visible to every rank)"):
        logger.info("block %d: loaded from cache", l)
    else:
        drift = None
        if s.corrected:  # the FP block gives the targets
            fp_block = copy.deepcopy(block)
            drift = (fp_block, block_caller(fp_block, extras, device, s.compute_dtype), fp_stream)
        calibrate_block(block, groups, call, x_in, targets, weights, s, generator, dtype, shard, l, n_layers, drift)
        del drift
        bad = [k for k, v in block.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise ValueError(f"block {l} calibrated to non-finite values in {bad[:3]}: check the model's weights "
                             "and the calibration settings (lr, damp)")
        if cache is not None and shard.world.is_main:
            cache.save(l, block, teacher)
    shard.world.check_identical(module_checksum(block), f"block {l} after calibration")
    with float_weights_kept(block):
        out_q = run_batched(call, x_in, s.batch_size)
    loss = stream_loss(targets, out_q[:m], w_log, logged)
    logger.info("block %d: weighted block-output MSE %.5g before calibration (RTN), %.5g after", l, loss_rtn, loss)
    block.to(dtype)
    return targets, out_q, {"block": l, "loss_rtn": loss_rtn, "loss": loss, "samples": logged.num_samples}
