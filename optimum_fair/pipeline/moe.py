"""Module surgery for mixture-of-experts families: fused experts become linears, tied blocks share them.

transformers 5 stores a layer's experts fused (`gate_up_proj` (E, 2 inter, d), `down_proj` (E, d, inter));
`unfuse_experts` turns them into a `RoutedExperts` of plain linears so every expert is quantized like
any linear. A family whose second stack of blocks shares every weight with the calibrated one
(DiffusionGemma: the encoder's text layers and the decoder's) has that stack left alone during
calibration and pointed at the very same packed modules afterwards (`tie_blocks`), so the model holds
one copy and a checkpoint stores the calibrated blocks only.
"""

from __future__ import annotations

import torch
from torch import nn

from ..arch import ModelAdapter
from ..modeling.experts import RoutedExperts
from ..nn import FairLinear
from .surgery import set_module


def tied_blocks(model: nn.Module, adapter: ModelAdapter) -> nn.ModuleList | None:
    """The blocks that share weights with `adapter.blocks`, or None."""
    if adapter.tied_blocks is None:
        return None
    tied = model.get_submodule(adapter.tied_blocks)
    if len(tied) != len(adapter.block_list(model)):
        raise ValueError(f"{adapter.tied_blocks} has {len(tied)} blocks, {adapter.blocks} "
                         f"{len(adapter.block_list(model))}")
    return tied


def unfuse_experts(model: nn.Module, adapter: ModelAdapter | None, with_tied: bool = False) -> int:
    """Replace the fused experts of every calibrated block (and of the tied blocks when `with_tied`, as
    a model about to load a checkpoint needs) by a `RoutedExperts`; returns how many.

    Every module at the experts path is checked first: one without the fused layout raises, naming it,
    and nothing is changed (an expert layout the adapter does not know is refused before any work).
    """
    if adapter is None or adapter.experts is None or not adapter.experts.fused:
        return 0
    path = adapter.experts.path
    stacks = [(adapter.blocks, adapter.block_list(model))]
    if with_tied and adapter.tied_blocks:
        stacks.append((adapter.tied_blocks, tied_blocks(model, adapter)))
    found = [(block, fused) for name, blocks in stacks for i, block in enumerate(blocks)
             if (fused := _fused(block, path, f"{name}.{i}.{path}", adapter)) is not None]
    for block, fused in found:
        set_module(block, path, RoutedExperts.from_fused(fused.gate_up_proj, fused.down_proj, fused.act_fn))
    return len(found)


def _fused(block: nn.Module, path: str, full: str, adapter: ModelAdapter) -> nn.Module | None:
    """The fused experts module at `path` of `block` (None: a dense layer, or already unfused)."""
    module = _get(block, path)
    if module is None or isinstance(module, RoutedExperts):
        return None
    gate_up, down, act = (getattr(module, n, None) for n in ("gate_up_proj", "down_proj", "act_fn"))
    if not (isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor) and gate_up.dim() == 3
            and down.dim() == 3 and isinstance(act, nn.Module)):
        raise ValueError(f"{full} is a {type(module).__name__} without the fused expert layout (3-D gate_up_proj, "
                         f"3-D down_proj, act_fn) the {adapter.name} adapter knows; nothing was quantized")
    return module


def check_tied(model: nn.Module, adapter: ModelAdapter) -> None:
    """Every parameter of each calibrated block must be the very tensor its tied block holds under the same
    name (run before `unfuse_experts`, which copies the fused experts)."""
    tied = tied_blocks(model, adapter)
    if tied is None:
        return
    for i, (block, twin) in enumerate(zip(adapter.block_list(model), tied, strict=True)):
        theirs = dict(twin.named_parameters())
        for name, param in block.named_parameters():
            if name not in theirs or theirs[name].data_ptr() != param.data_ptr():
                raise ValueError(f"{adapter.tied_blocks}.{i}.{name} is not the tensor {adapter.blocks}.{i}.{name}: "
                                 f"the {adapter.name} adapter needs the released weight tying (load the model "
                                 "without untying its weights)")


def tie_blocks(model: nn.Module, adapter: ModelAdapter) -> int:
    """Point each tied block at the calibrated block's packed modules (FairLinears, RoutedExperts);
    returns how many modules were shared."""
    tied = tied_blocks(model, adapter)
    if tied is None:
        return 0
    shared = 0
    for block, twin in zip(adapter.block_list(model), tied, strict=True):
        for name, module in list(block.named_modules()):
            if isinstance(module, (FairLinear, RoutedExperts)) and not _inside_experts(name, adapter):
                if _get(twin, name) is None:
                    raise ValueError(f"{adapter.tied_blocks} has no module {name} to share with {adapter.blocks}")
                set_module(twin, name, module)
                shared += 1
    return shared


def prepare_tied_load(model: nn.Module, adapter: ModelAdapter) -> None:
    """A model about to load a checkpoint whose tied blocks were written once (under the calibrated blocks):
    their own packed skeletons may stay uninitialised (`tie_blocks` replaces them after loading), so
    transformers neither re-ties their old parameter names nor reports them missing."""
    if adapter.tied_blocks is None:
        return
    drop_tied_keys(model, adapter)
    ignore = set(getattr(model, "_keys_to_ignore_on_load_missing", None) or ())
    model._keys_to_ignore_on_load_missing = ignore | {"^" + adapter.tied_blocks.replace(".", r"\.") + r"\."}


def drop_tied_keys(model: nn.Module, adapter: ModelAdapter) -> None:
    """Forget transformers' parameter ties into the tied blocks where they now share modules by identity
    (those names hold packed buffers or are gone; transformers' loader re-ties parameters only)."""
    keys = getattr(model, "all_tied_weights_keys", None)
    if adapter.tied_blocks is None or not keys:
        return
    prefix = adapter.tied_blocks + "."
    model.all_tied_weights_keys = {t: src for t, src in keys.items() if not t.startswith(prefix) or _is_param(model, t)}


def _is_param(model: nn.Module, name: str) -> bool:
    try:
        model.get_parameter(name)
    except AttributeError:
        return False
    return True


def _inside_experts(name: str, adapter: ModelAdapter) -> bool:
    return adapter.experts is not None and name.startswith(adapter.experts.path + ".")


def _get(module: nn.Module, name: str) -> nn.Module | None:
    try:
        return module.get_submodule(name)
    except AttributeError:
        return None
