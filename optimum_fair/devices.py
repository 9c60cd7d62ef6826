"""Where work runs: the one place that picks a device.

`default_device()` is what a model is loaded onto when the user names none; `execution_device(model)` is
where a loaded model's forward passes run (the accelerator in accelerate's `hf_device_map` for an
offloaded model, else the device of its first materialised parameter). `fast_dtype(device)` is the
machine's fastest native float dtype and `computing_in(model, dtype)` runs a model's forwards in one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

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


COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")


def _cpu_flags() -> set[str]:
    """The CPU feature flags Linux reports (empty elsewhere: the float32 fallback is taken)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def fast_dtype(device: torch.device) -> torch.dtype:
    """The fastest float dtype the device computes natively: bfloat16 on a GPU that has it (else
    float16), bfloat16 on a CPU with avx512_bf16 or AMX, else float32 (CPUs emulate half types slowly)."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and _cpu_flags() & {"avx512_bf16", "amx_bf16"}:
        return torch.bfloat16
    return torch.float32


def resolve_compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """A `compute_dtype` setting ("auto" or a dtype name) as the dtype forwards run in on `device`."""
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be one of {list(COMPUTE_DTYPES)}, got {name!r}")
    return fast_dtype(device) if name == "auto" else getattr(torch, name)


def model_float_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (float32 if it has none); packed scales are
    stored in it."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


@contextlib.contextmanager
def computing_in(model: nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """Run `model`'s forwards in `dtype` inside the block, leaving its weights as they were after it.

    A narrower dtype than the weights': autocast (the weights are cast per op, nothing is changed).
    A wider one (a half-precision model computed in float32): the model is cast in place and cast back,
    which is exact for float16 and bfloat16 weights. Inputs and outputs keep their own dtypes.
    """
    own = model_float_dtype(model)
    if dtype == own:
        yield
    elif torch.finfo(dtype).bits < torch.finfo(own).bits or (dtype, own) == (torch.bfloat16, torch.float16):
        with torch.autocast(execution_device(model).type, dtype=dtype):
            yield
    else:
        if any(p.device.type == "meta" for p in model.parameters()):
            raise ValueError(f"cannot compute an offloaded {own} model in {dtype}: set compute_dtype to "
                             f"'{str(own).removeprefix('torch.')}' or 'auto'")
        model.to(dtype)
        try:
            yield
        finally:
            model.to(own)
