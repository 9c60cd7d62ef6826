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

__all__ = ["RoutedExperts", "routed_tokens"]


def routed_tokens(top_k_index: torch.Tensor, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens routed to `expert` and the top-k slot that chose it.

    top_k_index: (T, k) expert ids per token (a token picks an expert at most once).
    Returns token_idx (n_e,) ascending and slot (n_e,), both int64.
    """
    hit = top_k_index == expert  # (T, k)
    token_idx, slot = hit.nonzero(as_tuple=True)  # row-major: ascending tokens
    return token_idx, slot


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
