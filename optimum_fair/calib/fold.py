"""A rotation of the residual stream folded into the weights (QuaRot's offline part), for weight-only targets.

With pre-norm blocks (RMSNorm, no bias), rotating the residual stream h -> h Q by an orthogonal Q (d, d)
leaves the network's function unchanged once (row vectors, W (out, in)):

    embedding            E  -> E Q
    a linear reading a norm's output (q/k/v, gate/up; the head after the final norm)
                         W  -> W diag(g) Q,  and the norm's gain g -> 1   (RMSNorm(h Q) = RMSNorm(h) Q)
    a linear writing the residual (attention output, down projection)
                         W  -> Q^T W,  b -> b Q

What is left is the same graph with unit norm gains, so llama.cpp runs the file as it is; the rotation
spreads outlier columns over all of them, which the per-32 weight grids round with less error.
"""

from __future__ import annotations

import torch
from torch import nn

from .rotation import hadamard, is_power_of_two, random_orthogonal

__all__ = ["fold_rotation", "residual_rotation"]


def residual_rotation(d: int, generator: torch.Generator) -> torch.Tensor:
    """Q (d, d) float64 orthogonal: a Hadamard matrix with random column signs when d is a power of two,
    else a random orthogonal matrix."""
    if not is_power_of_two(d):
        return random_orthogonal(d, generator=generator).double()
    signs = torch.randint(0, 2, (d,), generator=generator).double() * 2 - 1  # (d,)
    return hadamard(d, torch.float64) * signs  # columns scaled by +-1


@torch.no_grad()
def fold_rotation(model: nn.Module, blocks: list[nn.Module], groups: list[tuple[tuple[str, ...], ...]],
                  Q: torch.Tensor) -> None:
    """Fold Q (d, d) into `model` in place: the same function in float, every norm gain 1.

    blocks: the model's blocks in order; groups[i]: block i's linear groups in forward order (names
    relative to the block, as `arch.ModelAdapter.block_groups` gives them). They must alternate reader /
    writer (norm -> group 0, group 1 writes; norm -> group 2, group 3 writes), as in the dense LLaDA and
    Dream blocks; the head must not be tied to the embedding. ValueError otherwise, before anything is
    changed."""
    head, final = _check_foldable(model, blocks, groups)
    emb = model.get_input_embeddings()
    _set(emb.weight, emb.weight.double() @ Q)
    for block, block_groups in zip(blocks, groups, strict=True):
        norms = _norms(block)
        for norm, readers, writers in zip(norms, block_groups[0::2], block_groups[1::2], strict=True):
            for name in readers:
                _fold_reader(block.get_submodule(name), norm, Q)
            for name in writers:
                _fold_writer(block.get_submodule(name), Q)
            _set(norm.weight, torch.ones_like(norm.weight, dtype=torch.float64))
    _fold_reader(head, final, Q)
    _set(final.weight, torch.ones_like(final.weight, dtype=torch.float64))


def _check_foldable(model: nn.Module, blocks: list[nn.Module], groups: list):
    """(head, final norm), or ValueError naming what a folded rotation cannot hold."""
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or head.weight is emb.weight:
        raise ValueError("fold_rotation: the LM head is tied to the embedding (or missing); a folded rotation "
                         "needs them apart")
    for i, (block, block_groups) in enumerate(zip(blocks, groups, strict=True)):
        norms = _norms(block)
        if len(block_groups) != 4 or len(norms) != 2 or any(getattr(n, "bias", None) is not None for n in norms):
            raise ValueError(f"fold_rotation: block {i} is not a dense pre-norm block (2 RMSNorms, 4 linear "
                             f"groups; found {len(norms)} norms, {len(block_groups)} groups)")
    block_ids = {id(m) for b in blocks for m in b.modules()}
    finals = [m for m in model.modules() if _is_norm(m) and id(m) not in block_ids]
    if len(finals) != 1:
        raise ValueError(f"fold_rotation: expected one final norm outside the blocks, found {len(finals)}")
    return head, finals[0]


def _is_norm(module: nn.Module) -> bool:
    return type(module).__name__.endswith("RMSNorm") and getattr(module, "weight", None) is not None


def _norms(block: nn.Module) -> list[nn.Module]:
    return [m for m in block.modules() if _is_norm(m)]


def _fold_reader(linear: nn.Linear, norm: nn.Module, Q: torch.Tensor) -> None:
    w = linear.weight.double() * norm.weight.double()  # (out, in): diag(g) on the input side
    _set(linear.weight, w @ Q)


def _fold_writer(linear: nn.Linear, Q: torch.Tensor) -> None:
    _set(linear.weight, Q.T @ linear.weight.double())  # (d, in)
    if linear.bias is not None:
        _set(linear.bias, linear.bias.double() @ Q)


def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    param.copy_(value.to(param.dtype))
