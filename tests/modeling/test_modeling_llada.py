"""Native LLaDA: released names, block math, padding, save/reload, config checks."""

from __future__ import annotations

import math

import pytest
import torch

from optimum_fair.modeling import LLaDAConfig, LLaDAModelLM, require_mask_token_id

TINY = dict(
    d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, mlp_hidden_size=48,
    vocab_size=50, embedding_size=64, max_sequence_length=64, rope_theta=10000.0,
)

# Released LLaDA-8B checkpoint key names (one block; ff_out only when untied).
RELEASED_BLOCK_KEYS = [
    "attn_norm.weight", "q_proj.weight", "k_proj.weight", "v_proj.weight", "attn_out.weight",
    "ff_norm.weight", "ff_proj.weight", "up_proj.weight", "ff_out.weight",
]


def released_keys(n_layers: int, tied: bool) -> set[str]:
    keys = {"model.transformer.wte.weight", "model.transformer.ln_f.weight"}
    if not tied:
        keys.add("model.transformer.ff_out.weight")
    for i in range(n_layers):
        keys |= {f"model.transformer.blocks.{i}.{k}" for k in RELEASED_BLOCK_KEYS}
    return keys


def tiny(**overrides) -> LLaDAModelLM:
    torch.manual_seed(0)
    return LLaDAModelLM(LLaDAConfig(**{**TINY, **overrides})).eval()


@pytest.mark.parametrize("tied", [False, True])
def test_released_state_dict_loads_strict(tied: bool) -> None:
    model = tiny(weight_tying=tied)
    assert set(model.state_dict()) == released_keys(2, tied)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    fresh = {k: torch.randn(s) for k, s in shapes.items()}
    model.load_state_dict(fresh, strict=True)
    k_proj = model.model.transformer.blocks[1].k_proj.weight
    assert torch.equal(k_proj, fresh["model.transformer.blocks.1.k_proj.weight"])
    assert shapes["model.transformer.blocks.0.k_proj.weight"] == (16, 32)  # 2 kv heads * head_dim 8
    assert shapes["model.transformer.wte.weight"] == (64, 32)  # embedding_size rows


def test_tied_logits_use_wte() -> None:
    model = tiny(weight_tying=True)
    ids = torch.randint(0, 50, (1, 5))
    out = model(ids, output_hidden_states=True)
    final = out.hidden_states[-1]  # after ln_f
    expected = final @ model.model.transformer.wte.weight.T
    assert out.logits.shape == (1, 5, 64)
    torch.testing.assert_close(out.logits, expected, rtol=0, atol=1e-6)


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def _rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    # x: (batch, heads, seq, hd); rotate pair (j, j + hd/2) by angle pos * theta^(-2j/hd)
    hd, seq = x.shape[-1], x.shape[-2]
    half = hd // 2
    out = torch.empty_like(x)
    for pos in range(seq):
        for j in range(half):
            ang = pos * theta ** (-2.0 * j / hd)
            a, b = x[..., pos, j], x[..., pos, j + half]
            out[..., pos, j] = a * math.cos(ang) - b * math.sin(ang)
            out[..., pos, j + half] = b * math.cos(ang) + a * math.sin(ang)
    return out


def reference_block(block, x: torch.Tensor, cfg: LLaDAConfig) -> torch.Tensor:
    """LLaDA block from its definition, with explicit softmax attention."""
    b, s, d = x.shape
    nh, nkv, hd = cfg.n_heads, cfg.n_kv_heads, d // cfg.n_heads
    h = _rms(x, block.attn_norm.weight, cfg.rms_norm_eps)
    q = (h @ block.q_proj.weight.T).view(b, s, nh, hd).transpose(1, 2)
    k = (h @ block.k_proj.weight.T).view(b, s, nkv, hd).transpose(1, 2)
    v = (h @ block.v_proj.weight.T).view(b, s, nkv, hd).transpose(1, 2)
    q, k = _rope(q, cfg.rope_theta), _rope(k, cfg.rope_theta)
    group = nh // nkv
    heads = []
    for head in range(nh):
        kh, vh = k[:, head // group], v[:, head // group]
        p = torch.softmax(q[:, head] @ kh.transpose(-1, -2) / math.sqrt(hd), dim=-1)  # no causal mask
        heads.append(p @ vh)
    att = torch.cat(heads, dim=-1)  # (b, s, d)
    x = x + att @ block.attn_out.weight.T
    n = _rms(x, block.ff_norm.weight, cfg.rms_norm_eps)
    gate = n @ block.ff_proj.weight.T
    mlp = (gate * torch.sigmoid(gate) * (n @ block.up_proj.weight.T)) @ block.ff_out.weight.T
    return x + mlp


def test_block_matches_definition() -> None:
    model = tiny()
    with torch.no_grad():
        for p in model.parameters():  # non-trivial norm gains too
            p.add_(0.05 * torch.randn_like(p))
        block = model.model.transformer.blocks[0]
        x = torch.randn(2, 6, 32)
        ref = reference_block(block, x, model.config)
        torch.testing.assert_close(block(x), ref, rtol=0, atol=2e-5)
        torch.testing.assert_close(block(x, attention_mask=torch.ones(2, 6)), ref, rtol=0, atol=2e-5)


def test_is_bidirectional() -> None:
    model = tiny()
    ids = torch.randint(0, 50, (1, 6))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % 50
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    assert not torch.allclose(a[0, 0], b[0, 0])  # first position sees the last token


def test_padding_mask_hides_padded_tokens() -> None:
    model = tiny()
    ids = torch.randint(0, 50, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, 5:] = 0
    mask[1, :2] = 0  # left padding
    other = ids.clone()
    other[mask == 0] = (ids[mask == 0] + 7) % 50
    with torch.no_grad():
        a = model(ids, attention_mask=mask).logits
        b = model(other, attention_mask=mask).logits
        unmasked = model(other).logits
    real = mask.bool()
    torch.testing.assert_close(a[real], b[real], rtol=0, atol=1e-6)
    assert not torch.allclose(unmasked[real], a[real], atol=1e-4)  # the mask did something


def test_save_reload_identical(tmp_path) -> None:
    model = tiny(rope_theta=123.0)  # non-default theta must survive the reload
    ids = torch.randint(0, 50, (2, 9))
    model.save_pretrained(tmp_path)
    loaded = LLaDAModelLM.from_pretrained(tmp_path).eval()
    assert loaded.config.rope_theta == 123.0
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    block = loaded.model.transformer.blocks[0]
    x = torch.randn(1, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(block(x), reference_block(block, x, loaded.config), rtol=0, atol=2e-5)


def test_hidden_states_and_aliases() -> None:
    model = tiny()
    out = model(torch.randint(0, 50, (1, 4)), output_hidden_states=True)
    assert len(out.hidden_states) == 3
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_hidden_layers) == (32, 4, 2)
    assert cfg.num_key_value_heads == 2 and cfg.tie_word_embeddings is False


def test_mask_token_id_default_and_none() -> None:
    assert require_mask_token_id(LLaDAConfig(**TINY)) == 126336
    with pytest.raises(ValueError, match="mask_token_id"):
        require_mask_token_id(LLaDAConfig(**TINY, mask_token_id=None))


@pytest.mark.parametrize(
    "field,value",
    [("n_kv_heads", 3), ("block_type", "sequential"), ("layer_norm_type", "default"),
     ("embedding_size", 10), ("alibi", True), ("activation_type", "gelu")],
)
def test_bad_config_raises(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        LLaDAConfig(**{**TINY, field: value})


def test_alias_conflict_raises() -> None:
    assert LLaDAConfig(**{**TINY, "hidden_size": 32}).d_model == 32
    with pytest.raises(ValueError, match="d_model"):
        LLaDAConfig(**{**TINY, "hidden_size": 64})


def test_bad_attention_mask_raises() -> None:
    with pytest.raises(ValueError, match="attention_mask"):
        tiny()(torch.zeros(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 4))


def test_position_ids_default_and_explicit() -> None:
    model = tiny()
    ids = torch.randint(0, 50, (2, 5))
    with torch.no_grad():
        base = model(ids).logits
        assert torch.equal(model(ids, position_ids=torch.arange(5)).logits, base)
        shifted = model(ids, position_ids=torch.arange(5) + 3).logits
        spread = model(ids, position_ids=2 * torch.arange(5)).logits
    torch.testing.assert_close(shifted, base, rtol=0, atol=1e-5)  # RoPE is relative
    assert not torch.allclose(spread, base, atol=1e-4)  # ... and uses the given positions
    with pytest.raises(ValueError, match="position_ids"):
        model(ids, position_ids=torch.arange(4))
