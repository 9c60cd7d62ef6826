"""Routed experts as a list of ordinary modules, with one rule for which tokens each expert sees.

A mixture-of-experts layer routes each token to k experts. `RoutedExperts` holds the experts as
children `0 .. E-1` (each a module mapping (n, d) -> (n, d), usually a gated MLP of nn.Linear layers)
and is called like transformers 5's fused experts modules: `experts(x, top_k_index, top_k_weights)`.
Expert e reads the rows `routed_tokens(top_k_index, e)` of x, in ascending token order; calibration
uses the same function to give each expert's Hessian the weights of exactly the tokens it saw.
Because the experts are plain linears, quantizing them is the same as quantizing any other linear.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["GatedExpert", "RoutedExperts", "routed_tokens"]


def routed_tokens(top_k_index: torch.Tensor, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens routed to `expert` and the top-k slot that chose it.

    top_k_index: (T, k) expert ids per token (a token picks an expert at most once).
    Returns token_idx (n_e,) ascending and slot (n_e,), both int64.
    """
    hit = top_k_index == expert  # (T, k)
    token_idx, slot = hit.nonzero(as_tuple=True)  # row-major: ascending tokens
    return token_idx, slot


class GatedExpert(nn.Module):
    """One expert of transformers 5's fused layout as linears: gate | up = gate_up_proj(x) (first half
    gate), out = down_proj(act(gate) * up)."""

    def __init__(self, gate_up_proj: nn.Linear, down_proj: nn.Linear, act: nn.Module) -> None:
        super().__init__()
        self.gate_up_proj, self.down_proj, self.act_fn = gate_up_proj, down_proj, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # (n, inter) each
        return self.down_proj(self.act_fn(gate) * up)


class RoutedExperts(nn.ModuleList):
    """Experts `0 .. E-1` combined by the router's top-k weights.

    forward(x (T, d), top_k_index (T, k), top_k_weights (T, k)) -> (T, d_out):
    out[t] = Σ_slots top_k_weights[t, s] * expert_{top_k_index[t, s]}(x[t]), experts added in id order.
    """

    def forward(self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = None
        for e in torch.unique(top_k_index).tolist():  # only the experts some token picked
            if not 0 <= e < len(self):
                raise ValueError(f"top_k_index holds expert {e}, but there are {len(self)} experts")
            token_idx, slot = routed_tokens(top_k_index, e)
            y = self[e](x[token_idx]) * top_k_weights[token_idx, slot, None].to(x.dtype)  # (n_e, d_out)
            if out is None:
                out = x.new_zeros(x.shape[0], y.shape[-1])
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out if out is not None else x.new_zeros(x.shape[0], x.shape[-1])

    @classmethod
    @torch.no_grad()
    def from_fused(cls, gate_up: torch.Tensor, down: torch.Tensor, act: nn.Module) -> RoutedExperts:
        """Experts from transformers 5's fused tensors gate_up (E, 2 inter, d) and down (E, d, inter)
        (the weights are copied, on their device and in their dtype)."""
        experts, d_out, d_in = gate_up.shape
        if down.shape[:2] != (experts, d_in) or d_out % 2 or down.shape[2] != d_out // 2:
            raise ValueError(f"fused experts: gate_up_proj {tuple(gate_up.shape)} and down_proj "
                             f"{tuple(down.shape)} are not (E, 2 inter, d) and (E, d, inter)")
        out = []
        for e in range(experts):
            gu = nn.Linear(d_in, d_out, bias=False, device=gate_up.device, dtype=gate_up.dtype)
            dn = nn.Linear(d_out // 2, d_in, bias=False, device=down.device, dtype=down.dtype)
            if gate_up.device.type != "meta":
                gu.weight.copy_(gate_up[e])
                dn.weight.copy_(down[e])
            out.append(GatedExpert(gu, dn, act))
        return cls(out)
