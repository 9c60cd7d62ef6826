"""Where work runs: the one place that picks a device.

`default_device()` is what a model is loaded onto when the user names none; `execution_device(model)` is
where a loaded model's forward passes run (the accelerator in accelerate's `hf_device_map` for an
offloaded model, else the device of its first materialised parameter).
"""

from __future__ import annotations

import torch
from torch import nn


def default_device() -> torch.device:
    """cuda when a GPU is visible, else cpu."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def execution_device(model: nn.Module) -> torch.device:
    """Where forward passes of `model` run (see the module docstring)."""
    device_map = getattr(model, "hf_device_map", None) or {}
    for where in device_map.values():
        if isinstance(where, int):
            return torch.device("cuda", where)
        if where not in ("cpu", "disk"):
            return torch.device(where)
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")
