"""Module surgery: which linears are converted, empty FairLinear skeletons, and module replacement.

Used by the quantizer before weights load (a pre-quantized checkpoint needs FairLinear modules of the
right shapes on the meta device), by the block cache, and by the pipeline after calibration
(`convert_rtn` for linears that need no data).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch
from torch import nn
from tqdm.auto import tqdm

from ..arch import find_adapter
from ..calib.methods import ROUNDINGS, TRANSFORMS, TransformMethod
from ..calib.rotation import kron_factors
from ..enums import GGUFType, Rounding, Transform, WeightGrid
from ..grids import BLOCK_BITS, FALLBACKS, GRIDS, MIX_RULES, SUPER_BLOCK, BlockGrid, asymmetric_grid, linear_type
from ..nn import FairLinear

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerFormat:
    """What a converted linear stores, as plain values (no config object below the pipeline)."""

    w_bits: int
    a_bits: int
    group_size: int
    transform: Transform
    weight_grid: WeightGrid
    scale_dtype: torch.dtype | None = None  # what the scales are rounded to (None: the linear's dtype)
    mix: GGUFType | None = None  # a GGUF file type: each linear's grid is the type its rules give it (`at`)
    sym: bool = True  # False: per-group mins (`at` gives each linear its `grids.asymmetric_grid`)
    block_grid: BlockGrid | None = None  # a grid with mins or two-level scales (`optimum_fair.grids`), else None

    @property
    def method(self) -> TransformMethod:
        """The transform's record: what a converted linear stores for it."""
        return TRANSFORMS[self.transform]

    @property
    def grid(self) -> WeightGrid | BlockGrid:
        """What the rounding searches in: the K-quant grid, else the weight grid."""
        return self.block_grid or self.weight_grid

    def at(self, role: str | None, layer: int, n_layers: int, in_features: int) -> LayerFormat:
        """This format for one linear (a llama.cpp `role`, its block `layer` of `n_layers`, its input width):
        under a GGUF mix, the grid of the type llama.cpp's rules give it (`grids.linear_type`); with
        sym=False, the asymmetric grid of its groups (`grids.asymmetric_grid`); else itself."""
        if self.block_grid is not None:
            return self
        if self.mix is not None:
            qtype = linear_type(self.mix, role, layer, n_layers, in_features)
            if qtype not in GRIDS:
                return replace(self, w_bits=BLOCK_BITS[qtype], group_size=32, mix=None)
            grid = GRIDS[qtype]
            return replace(self, w_bits=grid.bits, group_size=grid.group, block_grid=grid, scale_dtype=torch.float32,
                           mix=None)
        if self.sym:
            return self
        grid = asymmetric_grid(self.w_bits, in_features if self.group_size == -1 else self.group_size)
        return replace(self, block_grid=grid, scale_dtype=torch.float32)


def formats(model: nn.Module, fmt: LayerFormat, linears: dict[str, nn.Linear]) -> dict[str, LayerFormat]:
    """{full name: its format} for `linears` of `model` (`LayerFormat.at`, block index and role from the
    family's adapter; a linear outside the blocks counts as block 0 with no role)."""
    adapter = find_adapter(model)
    if fmt.mix is None or adapter is None:
        return {name: fmt.at(None, 0, 1, m.in_features) for name, m in linears.items()}
    prefix, roles = adapter.blocks + ".", dict(adapter.roles)
    n_layers = len(adapter.block_list(model))
    out = {}
    for name, m in linears.items():
        index, _, inner = name.removeprefix(prefix).partition(".") if name.startswith(prefix) else ("0", "", "")
        out[name] = fmt.at(roles.get(inner), int(index), n_layers, m.in_features)
    return out


def matches(name: str, patterns: list[str]) -> bool:
    """True if module `name` is one of `patterns`, ends with '.<pattern>', or lies under one of them."""
    return any(name == p or name.endswith("." + p) or name.startswith(p + ".") for p in patterns)


def check_skip_names(model: nn.Module, patterns: list[str]) -> None:
    """Every entry of modules_to_not_convert must name at least one module of `model`."""
    names = [n for n, _ in model.named_modules() if n]
    unknown = [p for p in patterns if not any(matches(n, [p]) for n in names)]
    if unknown:
        raise ValueError(
            f"modules_to_not_convert names no module of {type(model).__name__}: {unknown}. "
            f"Examples of module names: {names[:6]}"
        )


def linears_to_convert(model: nn.Module, skip: list[str]) -> dict[str, nn.Linear]:
    """Every `nn.Linear` of `model` not matched by `skip`, in module order."""
    return {
        name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and not matches(name, skip)
    }


def unconvertible_weights(model: nn.Module, skip: list[str]) -> dict[str, list[str]]:
    """{module name: [parameter names]} of the weight matrices (2-D or more) that conversion would leave in
    float without being asked to: owned by a module that is neither a Linear nor an Embedding (fused
    3-D expert tensors, convolutions, custom projections), and not under `skip`."""
    found: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding, FairLinear)) or matches(name, skip):
            continue
        for pname, param in module.named_parameters(recurse=False):
            full = f"{name}.{pname}" if name else pname
            if param.dim() >= 2 and not matches(full, skip):
                found.setdefault(name, []).append(f"{pname} {tuple(param.shape)}")
    return found


def check_convertible(model: nn.Module, skip: list[str]) -> None:
    """Refuse, before any work, a model whose weights would partly stay float unasked (an expert layout or
    layer type this package does not quantize), naming the modules; `modules_to_not_convert` keeps them
    float on purpose."""
    found = unconvertible_weights(model, skip)
    if found:
        listed = "; ".join(f"{m}: {', '.join(p)}" for m, p in list(found.items())[:4])
        more = f" (and {len(found) - 4} more modules)" if len(found) > 4 else ""
        kinds = sorted({type(model.get_submodule(m)).__name__ for m in found})
        raise ValueError(
            f"{type(model).__name__} has {sum(map(len, found.values()))} weight tensors in {len(found)} modules "
            f"({', '.join(kinds)}) that optimum-fair cannot quantize (not nn.Linear): {listed}{more}. Quantizing "
            "the rest would leave them float silently; to keep them float on purpose, list them in "
            "modules_to_not_convert")


def check_group_size(linears: dict[str, nn.Linear], group_size: int) -> None:
    if group_size == -1:
        return
    bad = [f"{n} (in_features={m.in_features})" for n, m in linears.items() if m.in_features % group_size]
    if bad:
        raise ValueError(f"group_size {group_size} does not divide the input size of: {', '.join(bad[:5])}")


def log_fallbacks(linears: dict[str, nn.Module], fmt: LayerFormat) -> None:
    """Say once which linears a GGUF mix cannot give its super-block types because of their width (rows
    not a multiple of 256): they are calibrated in llama.cpp's fallback types, as llama-quantize writes."""
    if fmt.mix is None or not any(t in FALLBACKS for t in MIX_RULES[fmt.mix].types):
        return
    fell = sorted({n.rsplit(".", 1)[-1] for n, m in linears.items() if m.in_features % SUPER_BLOCK})
    if fell:
        logger.info("%s: %s have rows that are not a multiple of %d weights: calibrated in llama.cpp's fallback "
                    "types (%s), as llama-quantize writes them", fmt.mix.value, ", ".join(fell), SUPER_BLOCK,
                    ", ".join(sorted({FALLBACKS[t].value for t in MIX_RULES[fmt.mix].types if t in FALLBACKS})))


def skeleton(linear: nn.Linear, fmt: LayerFormat, dtype: torch.dtype) -> FairLinear:
    """An empty FairLinear with the buffers a checkpoint of this format holds for `linear`."""
    stores = fmt.method.stores
    return FairLinear(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        w_bits=fmt.w_bits,
        a_bits=fmt.a_bits,
        group_size=fmt.group_size,
        kron_dims=kron_factors(linear.in_features) if "transform_a" in stores else None,
        smooth="input_scale" in stores,
        act_clip="act_clip" in stores,
        dtype=dtype,
        device=linear.weight.device,
        grid=fmt.block_grid,
        scale_dtype=fmt.scale_dtype if fmt.block_grid is not None else None,
    )


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path `name`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def replace_with_skeletons(model: nn.Module, skip: list[str], fmt: LayerFormat, dtype: torch.dtype) -> list[str]:
    """Swap every convertible linear for an empty FairLinear (on the linear's device); returns names."""
    linears = linears_to_convert(model, skip)
    check_group_size(linears, fmt.group_size)
    for name, each in formats(model, fmt, linears).items():
        set_module(model, name, skeleton(linears[name], each, dtype))
    return list(linears)


@torch.no_grad()
def convert_rtn(model: nn.Module, linears: dict[str, nn.Linear], fmt: LayerFormat) -> None:
    """Round-to-nearest: each linear is replaced independently, no data needed."""
    each = formats(model, fmt, linears)
    for name, linear in tqdm(linears.items(), desc="RTN", leave=False):
        fair = round_linear(linear, each[name])
        set_module(model, name, fair.to(linear.weight.device))


def round_linear(linear: nn.Linear, fmt: LayerFormat) -> FairLinear:
    """`linear` rounded to nearest in its format (a K-quant grid through its search, `grids.choose`)."""
    if fmt.block_grid is None:
        return FairLinear.from_linear(linear, fmt.w_bits, fmt.a_bits, fmt.group_size, fmt.weight_grid,
                                      fmt.scale_dtype)
    codes, scale, mins = ROUNDINGS[Rounding.RTN].quantize(linear.weight.detach().float(), fmt.w_bits,
                                                          fmt.group_size, 1.0, fmt.block_grid, torch.float32)
    bias = None if linear.bias is None else linear.bias.detach()
    return FairLinear.from_codes(codes, scale, bias, fmt.w_bits, fmt.a_bits, fmt.group_size,
                                 dtype=linear.weight.dtype, mins=mins, scale_dtype=torch.float32, grid=fmt.block_grid)
