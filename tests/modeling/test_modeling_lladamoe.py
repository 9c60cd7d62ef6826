"""Native LLaDA-MoE against a plain re-implementation of the released forward (modeling_lladamoe.py).

The reference below is written from the released code's semantics, not from ours: Hugging Face's default
RoPE table, per-head q/k norms on a (-1, head_dim) view, explicit softmax attention with the additive
non-causal padding mask of transformers 4's AttentionMaskConverter.to_4d (dtype min on padded keys), and
the OLMoE expert loop (torch.where over a one-hot expert mask, slot-major rows, index_add_). Weights are
read by their released names.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel

from optimum_fair.modeling import LLaDAMoEConfig, LLaDAMoEModelLM, register_native_models
from optimum_fair.modeling.experts import RoutedExperts
from tests.conftest import tiny_lladamoe
from tests.modeling.released_ops import mlp, rms, rotate_half

VOCAB, MASK = 96, 95


def _released_moe(sd, p, cfg, x):
    b, s, h = x.shape
    xf = x.view(-1, h)
    probs = F.softmax(xf @ sd[p + "gate.weight"].T, dim=1, dtype=torch.float)
    if p + "expert_bias" in sd:
        probs = probs + sd[p + "expert_bias"]
    weights, selected = torch.topk(probs, cfg.num_experts_per_tok, dim=-1)
    weights = weights.to(x.dtype)
    out = torch.zeros(b * s, h, dtype=x.dtype)
    expert_mask = F.one_hot(selected, num_classes=cfg.num_experts).permute(2, 1, 0)
    for e in range(cfg.num_experts):
        idx, top_x = torch.where(expert_mask[e])
        cur = xf[None, top_x].reshape(-1, h)
        out.index_add_(0, top_x, mlp(sd, f"{p}experts.{e}.", cur) * weights[top_x, idx, None])
    return out.view(b, s, h)


def _released_attention(sd, p, cfg, x, cos, sin, mask2d):
    b, s, _ = x.shape
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd, eps = cfg.hidden_size // nh, cfg.rms_norm_eps
    q, k, v = (x @ sd[p + f"{n}_proj.weight"].T for n in "qkv")
    if cfg.qk_layernorm:
        q = rms(q.reshape(-1, hd), sd[p + "q_norm.weight"], eps).reshape(b, s, -1)
        k = rms(k.reshape(-1, hd), sd[p + "k_norm.weight"], eps).reshape(b, s, -1)
    if cfg.clip_qkv is not None:
        q, k, v = (t.clamp(-cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
    q = q.view(b, s, nh, hd).transpose(1, 2)
    k = k.view(b, s, nkv, hd).transpose(1, 2)
    v = v.view(b, s, nkv, hd).transpose(1, 2)
    c, sn = cos.unsqueeze(1), sin.unsqueeze(1)
    rd = c.shape[-1]
    q = torch.cat((q[..., :rd] * c + rotate_half(q[..., :rd]) * sn, q[..., rd:]), dim=-1)
    k = torch.cat((k[..., :rd] * c + rotate_half(k[..., :rd]) * sn, k[..., rd:]), dim=-1)
    k = k.repeat_interleave(nh // nkv, dim=1)
    v = v.repeat_interleave(nh // nkv, dim=1)
    scores = q @ k.transpose(2, 3) / math.sqrt(hd)
    if mask2d is not None:
        scores = scores + (1.0 - mask2d[:, None, None, :].to(scores.dtype)) * torch.finfo(scores.dtype).min
    attn = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v
    return attn.transpose(1, 2).reshape(b, s, -1) @ sd[p + "o_proj.weight"].T


def released_forward(model, ids, mask2d=None):
    """Logits and every layer's input, computed from the state dict alone."""
    cfg, sd = model.config, model.state_dict()
    eps, hd = cfg.rms_norm_eps, cfg.hidden_size // cfg.num_attention_heads
    rope = cfg.rope_parameters
    rd = int(hd * rope.get("partial_rotary_factor", 1.0))
    inv_freq = 1.0 / (rope["rope_theta"] ** (torch.arange(0, rd, 2, dtype=torch.int64).float() / rd))
    freqs = (inv_freq[None, :, None] @ torch.arange(ids.shape[1]).float()[None, None, :]).transpose(1, 2)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    h = sd["model.embed_tokens.weight"][ids]
    states = []
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        states.append(h)
        x = rms(h, sd[p + "input_layernorm.weight"], eps)
        h = h + _released_attention(sd, p + "self_attn.", cfg, x, cos, sin, mask2d)
        x = rms(h, sd[p + "post_attention_layernorm.weight"], eps)
        if cfg.moe_layer_freq[i]:
            out = _released_moe(sd, p + "mlp.", cfg, x)
            if p + "shared_expert.gate_proj.weight" in sd:
                out = out + mlp(sd, p + "shared_expert.", x)
        else:
            out = mlp(sd, p + "mlp.", x)
        h = h + out
    h = rms(h, sd["model.norm.weight"], eps)
    return h @ sd["lm_head.weight"].T, states


CASES = {
    "released-defaults": {},
    "partial-rope-bias-clip": dict(partial_rotary_factor=0.5, moe_router_enable_expert_bias=True, clip_qkv=0.3,
                                   qk_layernorm=False, num_key_value_heads=4, rope_theta=10000.0),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_forward_matches_the_released_computation_layer_by_layer(case):
    model = tiny_lladamoe(VOCAB, MASK, **CASES[case])
    if model.config.moe_router_enable_expert_bias:
        with torch.no_grad():  # a bias large enough to change which experts win
            for i in (1, 2):
                model.model.layers[i].mlp.expert_bias.copy_(torch.linspace(-0.2, 0.2, 8))
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 9:] = 0
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_hidden_states=True)
        ref, ref_states = released_forward(model, ids, mask)
    for ours, theirs in zip(out.hidden_states[:-1], ref_states, strict=True):
        torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(out.logits, ref, atol=2e-5, rtol=1e-4)


def test_parameter_names_are_the_released_ones():
    names = set(tiny_lladamoe(VOCAB, MASK, moe_router_enable_expert_bias=True).state_dict())
    for name in ["model.layers.0.mlp.gate_proj.weight", "model.layers.1.mlp.gate.weight",
                 "model.layers.1.mlp.expert_bias", "model.layers.2.mlp.experts.7.down_proj.weight",
                 "model.layers.1.shared_expert.up_proj.weight", "model.layers.1.self_attn.q_norm.weight",
                 "model.norm.weight", "lm_head.weight"]:
        assert name in names, name
    assert "model.layers.0.shared_expert.up_proj.weight" not in names  # dense layers have no shared expert


def test_routed_experts_equal_a_per_token_loop():
    g = torch.Generator().manual_seed(0)
    experts = RoutedExperts(torch.nn.Linear(6, 6) for _ in range(5))
    x, index = torch.randn(11, 6, generator=g), torch.stack([torch.randperm(5, generator=g)[:2] for _ in range(11)])
    weights = torch.rand(11, 2, generator=g)
    with torch.no_grad():
        out = experts(x, index, weights)
        ref = torch.stack([sum(weights[t, s] * experts[int(index[t, s])](x[t]) for s in range(2)) for t in range(11)])
    torch.testing.assert_close(out, ref)
    with pytest.raises(ValueError, match="expert 5, but there are 5"):
        experts(x, index.clamp(max=4) + (index == 4).long(), weights)


def test_released_config_saying_llada_loads_the_moe_classes(tmp_path):
    register_native_models()
    model = tiny_lladamoe(VOCAB, MASK)
    model.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw.update(model_type="llada", rope_theta=raw["rope_parameters"]["rope_theta"])  # as released
    raw.pop("rope_parameters")
    (tmp_path / "config.json").write_text(json.dumps(raw))
    config = AutoConfig.from_pretrained(tmp_path)
    assert type(config) is LLaDAMoEConfig and config.num_experts == 8
    loaded = AutoModel.from_pretrained(tmp_path)
    assert type(loaded) is LLaDAMoEModelLM
    ids = torch.randint(0, VOCAB, (1, 10))
    with torch.no_grad():
        # same weights (checked); loaded tensors may take other matmul paths: last-bit differences only
        ours, theirs = loaded.state_dict(), model.state_dict()
        assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize(("field", "value", "expected"), [
    ("num_experts_per_tok", 9, "num_experts_per_tok: expected in 1..num_experts=8"),
    ("moe_layer_freq", [1, 1], "moe_layer_freq: expected one entry per layer"),
    ("moe_router_score_function", "sigmoid", "moe_router_score_function: expected 'softmax'"),
    ("partial_rotary_factor", 0.1, "partial_rotary_factor x head_dim a positive even number"),
])
def test_bad_config_names_the_field(field, value, expected):
    with pytest.raises(ValueError, match=expected.replace("[", r"\[")):
        tiny_lladamoe(VOCAB, MASK, **{field: value})
