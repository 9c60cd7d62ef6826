"""Native LLaDA2 against a plain re-implementation of the released forward (modeling_llada2_moe.py).

Written from the released code's semantics: Hugging Face's default RoPE table on the rotated part,
fused q|k|v heads split on the head axis, per-head q/k norms, eager softmax attention with the additive
block-diffusion mask its generate() builds (tril over blocks, .log()), the sigmoid group-limited router
and `moe_infer`'s argsort-by-expert dispatch, summed over the top-k slots. Weights by released names.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from optimum_fair.modeling import LLaDA2MoeModelLM, block_diffusion_mask, register_native_models
from tests.conftest import tiny_llada2
from tests.modeling.released_ops import mlp, rms, rotate_half

VOCAB, MASK = 96, 95


def _router(sd, p, cfg, x):
    logits = F.linear(x.float(), sd[p + "gate.weight"].float())
    scores = torch.sigmoid(logits)
    routing = scores + sd[p + "gate.expert_bias"]
    t = x.shape[0]
    group_scores = routing.view(t, cfg.n_group, -1).topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=cfg.topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(t, cfg.n_group, cfg.num_experts // cfg.n_group).reshape(t, -1)
    idx = torch.topk(routing.masked_fill(~score_mask.bool(), float("-inf")), k=cfg.num_experts_per_tok, dim=-1)[1]
    w = torch.gather(scores, 1, idx)
    w = w / (w.sum(dim=-1, keepdim=True) + 1e-20) if cfg.num_experts_per_tok > 1 else w
    return idx, w * cfg.routed_scaling_factor


def _released_moe(sd, p, cfg, x):
    b, s, h = x.shape
    xf = x.view(-1, h)
    topk_ids, topk_weight = _router(sd, p, cfg, xf)
    cnts = topk_ids.new_zeros((topk_ids.shape[0], cfg.num_experts)).scatter_(1, topk_ids, 1)
    idxs = topk_ids.view(-1).argsort()
    sorted_tokens = xf[idxs // topk_ids.shape[1]]
    outs, start = [], 0
    for e, n in enumerate(cnts.sum(dim=0).tolist()):
        if n:
            outs.append(mlp(sd, f"{p}experts.{e}.", sorted_tokens[start:start + n]))
            start += n
    outs = torch.cat(outs)
    new_x = torch.empty_like(outs)
    new_x[idxs] = outs
    y = (new_x.view(*topk_ids.shape, -1).type(topk_weight.dtype) * topk_weight.unsqueeze(-1)).sum(dim=1)
    y = y.view(b, s, h)
    if p + "shared_experts.gate_proj.weight" in sd:
        y = y + mlp(sd, p + "shared_experts.", x)
    return y


def _released_attention(sd, p, cfg, x, cos, sin, additive):
    b, s, _ = x.shape
    nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    qkv = x @ sd[p + "query_key_value.weight"].T
    if p + "query_key_value.bias" in sd:
        qkv = qkv + sd[p + "query_key_value.bias"]
    q, k, v = qkv.view(b, s, nh + 2 * nkv, hd).split([nh, nkv, nkv], dim=-2)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if cfg.use_qk_norm:
        q = rms(q, sd[p + "query_layernorm.weight"], cfg.rms_norm_eps)
        k = rms(k, sd[p + "key_layernorm.weight"], cfg.rms_norm_eps)
    c, sn = cos.unsqueeze(1), sin.unsqueeze(1)
    rd = c.shape[-1]
    q = torch.cat([q[..., :rd] * c + rotate_half(q[..., :rd]) * sn, q[..., rd:]], dim=-1)
    k = torch.cat([k[..., :rd] * c + rotate_half(k[..., :rd]) * sn, k[..., rd:]], dim=-1)
    k, v = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)
    scores = q @ k.transpose(2, 3) * hd ** -0.5
    if additive is not None:
        scores = scores + additive
    out = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v
    out = out.transpose(1, 2).reshape(b, s, -1) @ sd[p + "dense.weight"].T
    return out + sd[p + "dense.bias"] if p + "dense.bias" in sd else out


def released_forward(model, ids, block_length=None):
    cfg, sd = model.config, model.state_dict()
    rd = cfg.rotary_dim
    inv_freq = 1.0 / (cfg.rope_parameters["rope_theta"] ** (torch.arange(0, rd, 2, dtype=torch.int64).float() / rd))
    freqs = (inv_freq[None, :, None] @ torch.arange(ids.shape[1]).float()[None, None, :]).transpose(1, 2)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    additive = None
    if block_length:  # the released generate()'s mask: tril over blocks, expanded, .log() (0 / -inf)
        n_blocks = ids.shape[1] // block_length
        blocks = torch.tril(torch.ones(n_blocks, n_blocks))
        additive = blocks.repeat_interleave(block_length, 0).repeat_interleave(block_length, 1)[None, None].log()
    h = sd["model.word_embeddings.weight"][ids]
    states = []
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        states.append(h)
        h = h + _released_attention(sd, p + "attention.", cfg, rms(h, sd[p + "input_layernorm.weight"],
                                                                     cfg.rms_norm_eps), cos, sin, additive)
        x = rms(h, sd[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
        h = h + (_released_moe(sd, p + "mlp.", cfg, x) if i >= cfg.first_k_dense_replace else mlp(sd, p + "mlp.", x))
    h = rms(h, sd["model.norm.weight"], cfg.rms_norm_eps)
    return h @ sd["lm_head.weight"].T, states


CASES = {
    "released-defaults": {},
    "full-rope-qkv-bias-no-norm": dict(partial_rotary_factor=1.0, use_qkv_bias=True, use_bias=False, use_qk_norm=False,
                                       num_experts_per_tok=1, routed_scaling_factor=1.0, num_shared_experts=0),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
@pytest.mark.parametrize("block_length", [None, 4])
def test_forward_matches_the_released_computation_layer_by_layer(case, block_length):
    model = tiny_llada2(VOCAB, MASK, **CASES[case])
    with torch.no_grad():  # a bias that changes which experts and groups win
        for i in (1, 2):
            model.model.layers[i].mlp.gate.expert_bias.copy_(torch.linspace(-0.3, 0.3, 8))
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = block_diffusion_mask(12, block_length) if block_length else None
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_hidden_states=True)
        ref, ref_states = released_forward(model, ids, block_length)
    for ours, theirs in zip(out.hidden_states[:-1], ref_states, strict=True):
        torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(out.logits, ref, atol=2e-5, rtol=1e-4)


def test_block_mask_hides_later_blocks_only():
    model = tiny_llada2(VOCAB, MASK)
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(2))
    changed = ids.clone()
    changed[0, 8:] = MASK  # the last block changes
    mask = block_diffusion_mask(12, 4)
    with torch.no_grad():
        a, b = model(ids, attention_mask=mask).logits, model(changed, attention_mask=mask).logits
        full_a, full_b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :8], b[:, :8], atol=1e-6, rtol=0)  # earlier blocks cannot see it (float noise)
    assert (full_a[:, :8] - full_b[:, :8]).abs().max() > 1e-4  # without the mask they do


@pytest.mark.parametrize("kw", [dict(use_cache=True), dict(past_key_values=object()), dict(cache=object()),
                                dict(cache_position=torch.arange(12))])
def test_kv_cache_arguments_are_refused(kw):
    # the shared LM forward (modeling.lm_head) takes the cache arguments; a family without a cache refuses them
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(3))
    with pytest.raises(ValueError, match="has no KV cache"):
        tiny_llada2(VOCAB, MASK)(ids, **kw)


def test_parameter_names_are_the_released_ones():
    names = set(tiny_llada2(VOCAB, MASK).state_dict())
    for name in ["model.word_embeddings.weight", "model.layers.0.mlp.gate_proj.weight",
                 "model.layers.1.attention.query_key_value.weight", "model.layers.1.attention.dense.bias",
                 "model.layers.1.attention.query_layernorm.weight", "model.layers.1.mlp.gate.weight",
                 "model.layers.1.mlp.gate.expert_bias", "model.layers.2.mlp.experts.7.down_proj.weight",
                 "model.layers.2.mlp.shared_experts.up_proj.weight", "lm_head.weight"]:
        assert name in names, name


def test_saved_model_reloads_through_the_auto_classes(tmp_path):
    from transformers import AutoModel

    register_native_models()
    model = tiny_llada2(VOCAB, MASK)
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert type(loaded) is LLaDA2MoeModelLM
    a, b = model.state_dict(), loaded.state_dict()
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(("field", "value", "expected"), [
    ("n_group", 3, "n_group: expected a positive divisor of num_experts=8"),
    ("topk_group", 5, "topk_group: expected in 1..n_group=4"),
    ("num_experts_per_tok", 5, "num_experts_per_tok: expected in 1..4"),
    ("use_sliding_window", True, "use_sliding_window: expected False"),
    ("moe_intermediate_size", None, "moe_intermediate_size: expected a positive int"),
])
def test_bad_config_names_the_field(field, value, expected):
    with pytest.raises(ValueError, match=expected):
        tiny_llada2(VOCAB, MASK, **{field: value})


def test_dense_layers_come_first():
    model = tiny_llada2(VOCAB, MASK, first_k_dense_replace=2)
    kinds = [type(layer.mlp).__name__ for layer in model.model.layers]
    assert kinds == ["LLaDAMoEMLP", "LLaDAMoEMLP", "LLaDA2MoeSparseMoeBlock"]
    assert math.isclose(model.config.routed_scaling_factor, 2.5)
