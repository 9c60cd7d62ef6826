"""Kernel choice for a whole model: `use_kernels(model)` and the `reference_kernels(model)` context."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from .kernels import INT8_MM, REFERENCE, SharedInput
from .linear import FairLinear

logger = logging.getLogger(__name__)


def use_kernels(model: nn.Module, kernel: str = "auto", packed: bool = False) -> Counter:
    """Put every FairLinear of `model` on `kernel` (see `FairLinear.set_kernel`); returns how many
    layers got each kernel. Layers that stay on the reference path are logged once, with the reasons."""
    chosen: Counter = Counter()
    reasons: Counter = Counter()
    for module in model.modules():
        if isinstance(module, FairLinear):
            reason = module.set_kernel(kernel, packed)
            chosen[module.kernel] += 1
            if reason:
                reasons[reason] += 1
    if reasons:
        logger.warning("fair_calib: %d layer(s) stay on the reference path: %s", sum(reasons.values()),
                       "; ".join(f"{n} x {why}" for why, n in reasons.items()))
    if chosen:
        logger.info("fair_calib kernels: %s", ", ".join(f"{n} {k}" for k, n in chosen.items()))
    share_inputs(model)
    return chosen


def share_inputs(model: nn.Module) -> int:
    """Link sibling int8_mm layers (children of one module) with the same input transform to one
    `SharedInput`, so q / k / v (gate / up) transform and quantize a shared input once; returns the
    number of groups linked. A layer given another input recomputes: the link is only a cache."""
    groups = 0
    for parent in model.modules():
        free = [m for m in parent.children() if isinstance(m, FairLinear) and m.kernel == INT8_MM]
        while free:
            first, rest = free[0], free[1:]
            group = [first] + [m for m in rest if first.same_input_transform(m)]
            free = [m for m in rest if m not in group]
            if len(group) > 1:
                shared = SharedInput()
                for m in group:
                    m.shared_input = shared
                groups += 1
    return groups


@contextmanager
def reference_kernels(model: nn.Module) -> Iterator[nn.Module]:
    """Run `model` on the fake-quant reference path inside the block, then restore each layer's kernel."""
    before = {m: (m.kernel, m.kernel_packed) for m in model.modules() if isinstance(m, FairLinear)}
    for module in before:
        module.set_kernel(REFERENCE)
    try:
        yield model
    finally:
        for module, (kernel, packed) in before.items():
            module.set_kernel(kernel, packed)
        share_inputs(model)
