"""Stage II statistics of one block over the calibration samples of every process.

Each process holds the samples of its batches (`distributed.DataShard`: batch b on rank b % N). The
three statistics Stage II needs are reduced so that N processes reproduce one process bit for bit:

* the block loss: per-sample float64 terms, put back in global sample order, then summed;
* the per-channel max |x| that seeds FlatQuant's smoothing: a max, which is exact;
* the GPTQ Hessian of a linear group: per-batch float64 sums Σ w x̃ x̃ᵀ added in global batch order
  (`World.fold`, one round of N batches at a time), divided by the token count.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..calib.gptq import hessian_sum
from ..calib.objective import weighted_sq_error
from ..calib.transforms import CalibLinear, channel_absmax
from ..distributed import DataShard


@torch.no_grad()
def stream_loss(ref: torch.Tensor, out: torch.Tensor, weights: torch.Tensor | None,
                shard: DataShard) -> float:
    """Token-weighted MSE of out against ref over the samples of all processes.

    ref, out: this process's (n_local, seq, d) streams; weights: (seq,) or (n_local, seq) or None.
    """
    terms = []
    for i in range(0, ref.shape[0], shard.batch_size):  # batch by batch: float64 copies stay small
        w = weights if weights is None or weights.dim() == 1 else weights[i:i + shard.batch_size]
        num, den = weighted_sq_error(ref[i:i + shard.batch_size], out[i:i + shard.batch_size], w,
                                     dtype=torch.float64)
        terms.append(torch.stack([num, den], dim=1))  # (b, 2)
    local = torch.cat(terms) if terms else torch.zeros(0, 2, dtype=torch.float64)
    both = shard.gather(local, what="block loss")  # (n, 2) in global sample order
    return float(both[:, 0].sum() / both[:, 1].sum())


@torch.no_grad()
def group_input_absmax(block: nn.Module, groups: tuple[tuple[str, ...], ...], call: Callable,
                       x_in: torch.Tensor, shard: DataShard) -> list[torch.Tensor]:
    """Per-channel max |x| of each group's input (d_g,) over the calibration streams of all processes."""
    running: list = [None] * len(groups)
    hooks = []
    for gi, group in enumerate(groups):
        def hook(module, args, gi=gi):
            running[gi] = channel_absmax(args[0], running[gi])
        hooks.append(block.get_submodule(group[0]).register_forward_pre_hook(hook))
    try:
        for i in range(0, x_in.shape[0], shard.batch_size):
            call(x_in[i:i + shard.batch_size])
    finally:
        for h in hooks:
            h.remove()
    world = shard.world
    return [world.all_reduce_max(r, f"input absmax of {g[0]}") for r, g in zip(running, groups, strict=True)]


@torch.no_grad()
def group_hessian(block: nn.Module, first: str, calib_linear: CalibLinear, call: Callable, x_in: torch.Tensor,
                  weights: torch.Tensor | None, shard: DataShard) -> torch.Tensor:
    """H = (1/n) Σ_i w_i x̃_i x̃_iᵀ (d, d) float64 of one group's transformed input (see `group_hessians`)."""
    return group_hessians(block, [first], [calib_linear], call, x_in, weights, shard)[0]


@torch.no_grad()
def group_hessians(block: nn.Module, firsts: list[str], calibs: list[CalibLinear], call: Callable,
                   x_in: torch.Tensor, weights: torch.Tensor | None, shard: DataShard) -> list[torch.Tensor]:
    """One H = (1/n) Σ_i w_i x̃_i x̃_iᵀ (d_g, d_g) float64 per group, from one pass of the block over x_in.

    firsts[g] is group g's first linear, calibs[g] its CalibLinear (whose transform gives x̃). A hook on
    each first linear turns each batch's input into that batch's Hessian sum (float32 products, added in
    float64), and the sums are added in global batch order over all processes. The block runs as it is:
    with earlier groups already quantized (one group per call, true-sequential) or none (all groups at
    once, as llm-compressor collects them).
    """
    sums: list = [None] * len(firsts)
    count, B = 0, shard.batch_size

    def hook_for(g: int):
        def hook(module, args):
            xt = calibs[g].transformed_input(args[0].float())  # (b, seq, d_g)
            sums[g] = hessian_sum(xt, state["w"], dtype=torch.float32)[0].double()

        return hook

    state: dict = {}
    handles = [block.get_submodule(name).register_forward_pre_hook(hook_for(g)) for g, name in enumerate(firsts)]
    totals: list = [None] * len(firsts)
    try:
        for r in range(shard.rounds):  # round r: batch r * N + rank on this rank, if any
            present = r * B < x_in.shape[0]
            sums[:] = [None] * len(firsts)
            if present:
                state["w"] = weights if weights is None or weights.dim() == 1 else weights[r * B:(r + 1) * B]
                call(x_in[r * B:(r + 1) * B])
                count += x_in[r * B:(r + 1) * B].shape[:2].numel()
            for g, (name, c) in enumerate(zip(firsts, calibs, strict=True)):
                if present and sums[g] is None:
                    raise RuntimeError(f"the block's forward never reached {name}: no Hessian for its group")
                d = c.weight.shape[1]  # a rank without this batch adds zeros
                part = sums[g] if present else torch.zeros(d, d, dtype=torch.float64, device=c.weight.device)
                totals[g] = shard.world.fold(totals[g], part, present, what=f"Hessian of {name}")
    finally:
        for h in handles:
            h.remove()
    total = shard.world.all_reduce_sum(torch.tensor([count], dtype=torch.int64), "calibration token count")
    return [H / int(total) for H in totals]


@torch.no_grad()
def module_checksum(module: nn.Module) -> torch.Tensor:
    """One int64 per state-dict tensor: a position-weighted sum of its bytes (a changed byte changes it)."""
    sums = []
    for _, t in sorted(module.state_dict().items()):
        raw = t.detach().contiguous().reshape(-1).view(torch.uint8).long()  # (numel * itemsize,)
        pos = torch.arange(raw.numel(), device=raw.device) % 65521 + 1
        sums.append(int((raw * pos).sum()))
    return torch.tensor(sums, dtype=torch.int64)
