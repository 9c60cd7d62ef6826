"""Stage II statistics of one block over the calibration samples of every process.

Each process holds the samples of its batches (`distributed.DataShard`: batch b on rank b % N). The
three statistics Stage II needs are reduced so that N processes reproduce one process bit for bit:

* the block loss: per-sample float64 terms, put back in global sample order, then summed;
* the per-channel max |x| that seeds FlatQuant's smoothing: a max, which is exact;
* the GPTQ Hessian of a linear group: per-batch float64 sums Σ w x̃ x̃ᵀ added in global batch order
  (`World.fold`, one round of N batches at a time), divided by the token count (an expert's: the
  tokens routed to it, summed over processes).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from ..calib.gptq import drift_sum, hessian_sum
from ..calib.objective import expand_token_weights, weighted_sq_error
from ..calib.transforms import CalibLinear, channel_absmax
from ..distributed import DataShard
from ..modeling.experts import RoutedExperts, routed_tokens


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
    """Per-channel max |x| of each group's input (d_g,) over the calibration streams of all processes
    (zeros for an expert that no token reached)."""
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
    out = []
    for r, g in zip(running, groups, strict=True):
        if r is None:  # an expert no token of this process was routed to: zeros, the neutral element of max
            first = block.get_submodule(g[0])
            r = torch.zeros(first.weight.shape[1], device=first.weight.device)
        out.append(world.all_reduce_max(r, f"input absmax of {g[0]}"))
    return out


class _HessiansTaken(Exception):
    """Raised by the last group's hook: the rest of the block's forward is not needed for its Hessians."""


@torch.no_grad()
def group_hessian(block: nn.Module, first: str, calib_linear: CalibLinear, call: Callable, x_in: torch.Tensor,
                  weights: torch.Tensor | None, shard: DataShard) -> torch.Tensor:
    """H = (1/n) Σ_i w_i x̃_i x̃_iᵀ (d, d) float64 of one group's transformed input (see `group_hessians`)."""
    return group_hessians(block, [first], [calib_linear], call, x_in, weights, shard)[0]


@torch.no_grad()
def group_hessians(block: nn.Module, firsts: list[str], calibs: list[CalibLinear], call: Callable,
                   x_in: torch.Tensor, weights: torch.Tensor | None, shard: DataShard) -> list[torch.Tensor]:
    """`counted_hessians` without the counts; a group that saw no token gets a zero Hessian."""
    hessians, _ = counted_hessians(block, firsts, calibs, call, x_in, weights, shard)
    return hessians


@torch.no_grad()
def counted_hessians(block: nn.Module, firsts: list[str], calibs: list[CalibLinear], call: Callable,
                     x_in: torch.Tensor, weights: torch.Tensor | None,
                     shard: DataShard) -> tuple[list[torch.Tensor], list[int]]:
    """One H = (1/n_g) Σ_i w_i x̃_i x̃_iᵀ (d_g, d_g) float64 per group from one pass of the block over x_in,
    and the number n_g of tokens each group read (over all processes).

    firsts[g] is group g's first linear, calibs[g] its CalibLinear (whose transform gives x̃). A hook on
    each first linear turns each batch's input into that batch's Hessian sum (float32 products, added in
    float64, also inside a forward under bfloat16 autocast: `compute_dtype`), and the sums are added in
    global batch order over all processes. The block runs as it is:
    with earlier groups already quantized (one group per call, true-sequential) or none (all groups at
    once, as llm-compressor collects them); without routed experts each batch's forward stops at the last
    group's input (nothing after it is needed). A linear inside a routed expert (`modeling.experts.RoutedExperts`)
    reads only the tokens routed to it: its rows get those tokens' weights, and n_g counts them; such a
    group may see no token of a batch (or of the whole run, n_g = 0, H = 0).
    """
    sums: list = [None] * len(firsts)
    counts = [0] * len(firsts)
    B = shard.batch_size
    state: dict = {"routes": {}}
    experts = [expert_of(block, name) for name in firsts]
    # without routed experts the groups' inputs arrive in list (forward) order: each batch's forward
    # stops at the last group's input (a dense LLaDA block skips its down projection)
    last = len(firsts) - 1 if all(e is None for e in experts) else None

    def hook_for(g: int):
        def hook(module, args):
            x = args[0].float()
            w = state["w"]
            if experts[g] is not None:  # (n_e, d): this expert's rows of the flattened batch
                path, e = experts[g]
                rows, _ = routed_tokens(state["routes"][path], e)
                w = state["flat_w"].to(rows.device)[rows]
            with torch.autocast(x.device.type, enabled=False):  # float32 products inside a bf16 forward
                xt = calibs[g].transformed_input(x)  # (b, seq, d_g) or (n_e, d_g)
                sums[g] = hessian_sum(xt, w, dtype=torch.float32)[0]  # folded into float64 totals below
            counts[g] += xt.shape[:-1].numel()
            if g == last:
                raise _HessiansTaken

        return hook

    handles = [block.get_submodule(name).register_forward_pre_hook(hook_for(g)) for g, name in enumerate(firsts)]
    handles += recording_routes(block, state["routes"])
    totals = [torch.zeros(c.weight.shape[1], c.weight.shape[1], dtype=torch.float64, device=c.weight.device)
              for c in calibs]  # (d_g, d_g) each
    try:
        for r in range(shard.rounds):  # round r: batch r * N + rank on this rank, if any
            present = r * B < x_in.shape[0]
            sums[:] = [None] * len(firsts)
            if present:
                xb = x_in[r * B:(r + 1) * B]
                state["w"] = weights if weights is None or weights.dim() == 1 else weights[r * B:(r + 1) * B]
                state["flat_w"] = expand_token_weights(state["w"], xb.shape[0], xb.shape[1], xb.device).reshape(-1)
                with contextlib.suppress(_HessiansTaken):
                    call(xb)
            for g, (name, c) in enumerate(zip(firsts, calibs, strict=True)):
                if present and sums[g] is None and experts[g] is None:
                    raise RuntimeError(f"the block's forward did not reach {name} before {firsts[-1]}: no Hessian "
                                       "for its group (the groups must be listed in forward order)")
                d = c.weight.shape[1]  # a rank without this batch (or an expert without tokens) adds zeros
                part = sums[g] if sums[g] is not None else torch.zeros(d, d, device=c.weight.device)
                totals[g] = shard.world.fold(totals[g], part, present, what=f"Hessian of {name}")
    finally:
        for h in handles:
            h.remove()
    total = shard.world.all_reduce_sum(torch.tensor(counts, dtype=torch.int64), "calibration token counts")
    counted = [int(n) for n in total]
    return [H / max(n, 1) for H, n in zip(totals, counted, strict=True)], counted


@torch.no_grad()
def drift_moments(inputs: Callable[[int, int], list[tuple[torch.Tensor, torch.Tensor]]], n_local: int,
                  weights: torch.Tensor | None, dims: list[int], names: list[str], device: torch.device,
                  shard: DataShard) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(H, D) per input of a linear, over the samples of all processes: H = (1/n) Σ_i w_i x̃_i x̃_iᵀ (as
    `counted_hessians`) and D = (1/n) Σ_i w_i (x_fp,i - x̃_i) x̃_iᵀ (`gptq.drift_sum`), both (d_g, d_g) float64.

    inputs(lo, hi) -> [(x_fp, x̃)] per input g, each (b, seq, d_g): its inputs for this process's samples
    lo:hi (n_local in all) on the FP and the quantized stream; batch sums added in global batch order over
    the processes (`World.fold`); names[g] says whose sums they are in a disagreement message."""
    totals = [[torch.zeros(d, d, dtype=torch.float64, device=device) for _ in range(2)] for d in dims]  # [H, D]
    B, n = shard.batch_size, 0
    for r in range(shard.rounds):  # round r: batch r * N + rank on this rank, if any
        present = r * B < n_local
        pairs = inputs(r * B, (r + 1) * B) if present else [None] * len(dims)
        w = weights if weights is None or weights.dim() == 1 else weights[r * B:(r + 1) * B]
        n += pairs[0][1].shape[:-1].numel() if present else 0
        for g, (pair, d) in enumerate(zip(pairs, dims, strict=True)):
            parts = (hessian_sum(pair[1], w, dtype=torch.float32)[0],
                     drift_sum(pair[0], pair[1], w, dtype=torch.float32)) if present \
                else (torch.zeros(d, d, device=device),) * 2
            totals[g] = [shard.world.fold(total, part, present, what=f"{what} of {names[g]}")
                         for total, part, what in zip(totals[g], parts, ("Hessian", "input drift"), strict=True)]
    count = int(shard.world.all_reduce_sum(torch.tensor([n], dtype=torch.int64), "calibration token counts")[0])
    return [(H / max(count, 1), D / max(count, 1)) for H, D in totals]


@torch.no_grad()
def group_drifts(block: nn.Module, fp_block: nn.Module, firsts: list[str], calibs: list[CalibLinear],
                 call: Callable, fp_call: Callable, x_in: torch.Tensor, x_fp: torch.Tensor,
                 weights: torch.Tensor | None, shard: DataShard) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`drift_moments` of each group of a dense block, from one pass of each block: x̃_i the group's
    transformed input in `block` (as it is now) on the quantized stream x_in, x_fp,i its input in the FP
    block `fp_block` on the FP stream x_fp (the same samples), both transformed by calibs[g]. call /
    fp_call run block / fp_block on a batch."""
    found: dict = {}

    def hook_for(key: tuple, g: int):
        def hook(module, args):
            with torch.autocast(args[0].device.type, enabled=False):
                found[key] = calibs[g].transformed_input(args[0].float())  # (b, seq, d_g)
            if g == len(firsts) - 1:
                raise _HessiansTaken

        return hook

    def inputs(lo: int, hi: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        found.clear()
        for run, x in ((fp_call, x_fp), (call, x_in)):
            with contextlib.suppress(_HessiansTaken):
                run(x[lo:hi])
        return [(found[("fp", g)], found[("q", g)]) for g in range(len(firsts))]

    handles = [m.get_submodule(name).register_forward_pre_hook(hook_for((side, g), g))
               for side, m in (("fp", fp_block), ("q", block)) for g, name in enumerate(firsts)]
    try:
        return drift_moments(inputs, x_in.shape[0], weights, [c.weight.shape[1] for c in calibs], firsts,
                             calibs[0].weight.device, shard)
    finally:
        for h in handles:
            h.remove()


def expert_of(block: nn.Module, name: str) -> tuple[str, int] | None:
    """(path of the RoutedExperts module, expert id) when linear `name` of `block` lies in an expert."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        path = ".".join(parts[:i])
        if isinstance(block.get_submodule(path), RoutedExperts):
            return path, int(parts[i])
    return None


def recording_routes(block: nn.Module, routes: dict) -> list:
    """Hooks that store each RoutedExperts call's top_k_index (T, k) in routes[path]; returns the handles."""
    handles = []
    for path, module in block.named_modules():
        if isinstance(module, RoutedExperts):
            def hook(module, args, path=path):
                routes[path] = args[1]
            handles.append(module.register_forward_pre_hook(hook))
    return handles


@torch.no_grad()
def module_checksum(module: nn.Module) -> torch.Tensor:
    """One int64 per state-dict tensor: a position-weighted sum of its bytes (a changed byte changes it)."""
    sums = []
    for _, t in sorted(module.state_dict().items()):
        raw = t.detach().contiguous().reshape(-1).view(torch.uint8).long()  # (numel * itemsize,)
        pos = torch.arange(raw.numel(), device=raw.device) % 65521 + 1
        sums.append(int((raw * pos).sum()))
    return torch.tensor(sums, dtype=torch.int64)
