"""Accelerate glue for Stage II: one block's weights on the compute device while it is calibrated."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from accelerate.hooks import remove_hook_from_module
from accelerate.utils import has_offloaded_params, named_module_tensors, set_module_tensor_to_device
from torch import nn


@contextlib.contextmanager
def onloaded(block: nn.Module, device: torch.device) -> Iterator[None]:
    """Block l's weights on `device` while it is calibrated; the blocks not yet reached stay offloaded.

    A block offloaded by accelerate (CPU or disk offload: `AlignDevicesHook`s on the leaves owning
    parameters) is materialised from its offload store and its hooks are removed: after calibration it
    holds FairLinears (a quarter of the float weights at W4) and its norms, and stays resident. A
    plain block moves to `device` and back.
    """
    offloaded = [m for m in block.modules() if has_offloaded_params(m)]
    for module in offloaded:
        materialize(module, device)
    if offloaded:
        yield
        return
    home = next(block.parameters()).device
    block.to(device)
    try:
        yield
    finally:
        block.to(home)


def materialize(module: nn.Module, device: torch.device) -> None:
    """Load an accelerate-offloaded module's tensors from its hook's store and drop the hook."""
    hook = module._hf_hook
    names = [n for n, _ in named_module_tensors(module, include_buffers=hook.offload_buffers,
                                                recurse=hook.place_submodules)]
    for name in names:
        set_module_tensor_to_device(module, name, device, value=hook.weights_map[name])
    remove_hook_from_module(module)
    # accelerate puts the class's forward back as a bound method in the instance dict: a module ->
    # method -> module cycle that only the cyclic GC frees, so each replaced float linear (a whole
    # float32 block's worth per block) would outlive its block. The class attribute does the same job.
    forward = module.__dict__.get("forward")
    if getattr(forward, "__self__", None) is module and getattr(forward, "__func__", None) is type(module).forward:
        del module.__dict__["forward"]
