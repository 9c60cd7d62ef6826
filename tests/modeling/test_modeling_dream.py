"""Native Dream: released names, equality with Qwen2 under a full mask, padding, save/reload."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from optimum_fair.modeling import DreamConfig, DreamModel, require_mask_token_id

TINY = dict(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, pad_token_id=60, bos_token_id=61, eos_token_id=61,
)

RELEASED_LAYER_KEYS = [
    "input_layernorm.weight", "post_attention_layernorm.weight",
    "self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.weight", "self_attn.k_proj.bias",
    "self_attn.v_proj.weight", "self_attn.v_proj.bias", "self_attn.o_proj.weight",
    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
]


def released_keys(n_layers: int) -> set[str]:
    keys = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(n_layers):
        keys |= {f"model.layers.{i}.{k}" for k in RELEASED_LAYER_KEYS}
    return keys


def tiny(**overrides) -> DreamModel:
    torch.manual_seed(0)
    model = DreamModel(DreamConfig(**{**TINY, **overrides})).eval()
    with torch.no_grad():  # make biases and norm gains non-trivial
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("tied", [False, True])
def test_released_state_dict_loads_strict(tied: bool) -> None:
    model = tiny(tie_word_embeddings=tied)
    assert set(model.state_dict()) == released_keys(2)
    fresh = {k: torch.randn(v.shape) for k, v in model.state_dict().items()}
    fresh["lm_head.weight"] = fresh["model.embed_tokens.weight"] if tied else fresh["lm_head.weight"]
    model.load_state_dict(fresh, strict=True)
    assert torch.equal(model.model.layers[1].self_attn.k_proj.bias, fresh["model.layers.1.self_attn.k_proj.bias"])
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (16, 32)  # 2 kv heads * head_dim 8
    assert model.model.layers[0].self_attn.o_proj.bias is None


def qwen2_twin(model: DreamModel) -> Qwen2ForCausalLM:
    c = model.config
    cfg = Qwen2Config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps, rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta_value},
        tie_word_embeddings=c.tie_word_embeddings, use_sliding_window=False, attn_implementation="eager",
    )
    twin = Qwen2ForCausalLM(cfg).eval()
    twin.load_state_dict(model.state_dict(), strict=True)
    return twin


@pytest.mark.parametrize("tied", [False, True])
def test_matches_qwen2_with_full_mask(tied: bool) -> None:
    model = tiny(rope_theta=1000.0, tie_word_embeddings=tied)
    twin = qwen2_twin(model)
    ids = torch.randint(0, 64, (2, 9))
    full = torch.zeros(2, 1, 9, 9)  # additive mask: every query sees every key
    with torch.no_grad():
        ours = model(ids).logits
        ref = twin(ids, attention_mask={"full_attention": full}).logits
        causal = twin(ids).logits
    diff = (ours - ref).abs().max().item()
    print(f"max |Dream - Qwen2(full mask)| logit diff (tied={tied}): {diff:.3e}")
    assert diff < 1e-5
    assert (ours - causal).abs().max().item() > 1e-3  # the reference really is non-causal


def test_padding_mask_hides_padded_tokens() -> None:
    model = tiny()
    ids = torch.randint(0, 60, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, 6:] = 0
    mask[1, :3] = 0
    other = ids.clone()
    other[mask == 0] = (ids[mask == 0] + 5) % 60
    with torch.no_grad():
        a = model(ids, attention_mask=mask).logits
        b = model(other, attention_mask=mask).logits
        unmasked = model(other).logits
    real = mask.bool()
    torch.testing.assert_close(a[real], b[real], rtol=0, atol=1e-6)
    assert not torch.allclose(unmasked[real], a[real], atol=1e-4)


def test_padding_mask_equals_qwen2_key_mask() -> None:
    model = tiny()
    twin = qwen2_twin(model)
    ids = torch.randint(0, 60, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    additive = torch.zeros(2, 1, 7, 7)
    additive[1, :, :, 5:] = torch.finfo(torch.float32).min  # hide padded keys only
    with torch.no_grad():
        ours = model(ids, attention_mask=mask).logits
        ref = twin(ids, attention_mask={"full_attention": additive}).logits
    assert (ours - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("tied", [False, True])
def test_save_reload_identical(tmp_path, tied: bool) -> None:
    model = tiny(rope_theta=321.0, tie_word_embeddings=tied)
    ids = torch.randint(0, 64, (2, 9))
    model.save_pretrained(tmp_path)
    loaded = DreamModel.from_pretrained(tmp_path).eval()
    assert loaded.config.rope_theta_value == 321.0
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tied
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
        ref = qwen2_twin(loaded)(ids, attention_mask={"full_attention": torch.zeros(2, 1, 9, 9)}).logits
        assert (loaded(ids).logits - ref).abs().max().item() < 1e-5  # RoPE right after reload


def test_layer_callable_directly() -> None:
    model = tiny()
    ids = torch.randint(0, 64, (1, 6))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        layer1_in = out.hidden_states[1]
        direct = model.model.layers[0](out.hidden_states[0])
    assert len(out.hidden_states) == 3
    torch.testing.assert_close(direct, layer1_in, rtol=0, atol=1e-6)


def test_mask_token_id_default_and_none() -> None:
    assert require_mask_token_id(DreamConfig(**TINY)) == 151666
    with pytest.raises(ValueError, match="mask_token_id"):
        require_mask_token_id(DreamConfig(**TINY, mask_token_id=None))


@pytest.mark.parametrize(
    "field,value",
    [("num_key_value_heads", 3), ("hidden_act", "gelu"), ("use_sliding_window", True),
     ("rope_parameters", {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4})],
)
def test_bad_config_raises(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        DreamConfig(**{**TINY, field: value})
