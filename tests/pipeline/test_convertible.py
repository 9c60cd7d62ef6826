"""A model whose weights would partly stay float (fused 3-D experts, unknown layer types) is refused before
any work, naming the modules; modules_to_not_convert keeps them float on purpose."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from optimum_fair import FairCalibConfig, quantize
from optimum_fair.nn import FairLinear
from optimum_fair.pipeline.surgery import unconvertible_weights
from tests.conftest import char_tokenizer, tiny_llada

RTN = dict(rounding="rtn", transform="none", weighting="uniform")


class FusedExperts(nn.Module):
    """Experts stored as 3-D tensors, as transformers 5 fuses them (gate_up_proj, down_proj)."""

    def __init__(self, d: int, hidden: int, n: int = 4):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(n, d, 2 * hidden) * 0.02)
        self.down_proj = nn.Parameter(torch.randn(n, hidden, d) * 0.02)

    def forward(self, x):
        h = torch.einsum("bsd,dh->bsh", x, self.gate_up_proj[0])
        gate, up = h.chunk(2, -1)
        return torch.einsum("bsh,hd->bsd", nn.functional.silu(gate) * up, self.down_proj[0])


def _add_experts(model):
    """Put a FusedExperts module beside each block's MLP output projection (weights only; never called)."""
    names = []
    for name, module in list(model.named_modules()):
        if ".blocks." in name and name.endswith("ff_out") and isinstance(module, nn.Linear):
            parent = model.get_submodule(name.rsplit(".", 1)[0])
            parent.register_module("experts", FusedExperts(module.out_features, 16))
            names.append(name.rsplit(".", 1)[0] + ".experts")
    return names


def test_fused_experts_are_listed_and_refused_before_work():
    tok = char_tokenizer()
    model = tiny_llada(len(tok), tok.mask_token_id)
    experts = _add_experts(model)
    assert len(experts) == 2
    found = unconvertible_weights(model, [])
    assert sorted(found) == sorted(experts)
    assert found[experts[0]] == ["gate_up_proj (4, 64, 32)", "down_proj (4, 16, 64)"]
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"4 weight tensors in 2 modules \(FusedExperts\).*modules_to_not_convert"):
        quantize(model, FairCalibConfig(**RTN), tokenizer=tok)
    assert not any(isinstance(m, FairLinear) for m in model.modules())  # nothing was converted
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_listed_experts_stay_float_on_purpose():
    tok = char_tokenizer()
    model = tiny_llada(len(tok), tok.mask_token_id)
    experts = _add_experts(model)
    head = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and "blocks" not in n]
    quantize(model, FairCalibConfig(**RTN, modules_to_not_convert=experts + head), tokenizer=tok)
    converted = [n for n, m in model.named_modules() if isinstance(m, FairLinear)]
    assert converted and all(isinstance(model.get_submodule(e), FusedExperts) for e in experts)


def test_dense_families_have_nothing_unconvertible(tiny_llama):
    tok = char_tokenizer()
    assert unconvertible_weights(tiny_llada(len(tok), tok.mask_token_id), []) == {}
    assert unconvertible_weights(tiny_llama, []) == {}


def test_diffusion_gemma_fused_experts_are_quantized_not_left_float():
    # transformers' own MoE diffusion model: its default skip list names the expert parameters, which
    # used to leave them float without a word; its adapter now turns them into linears and packs them
    from optimum_fair.arch import DIFFUSION_GEMMA
    from tests.pipeline.test_diffusion_gemma import tiny_gemma

    model = tiny_gemma()
    found = unconvertible_weights(model, [])
    experts = [m for m in found if m.endswith(".experts")]
    assert len(experts) == 4  # 2 encoder + 2 decoder layers
    assert all(found[m] == ["gate_up_proj (4, 32, 32)", "down_proj (4, 32, 16)"] for m in experts)
    quantize(model, FairCalibConfig(**RTN))
    assert unconvertible_weights(model, list(DIFFUSION_GEMMA.float_modules)) == {}
    assert not any(type(m).__name__ == "DiffusionGemmaTextExperts" for m in model.modules())
    assert sum(isinstance(m, FairLinear) for m in model.modules()) > 0
