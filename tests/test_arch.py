import pytest
import torch
from torch import nn

from optimum_fair.arch import DREAM, LLADA, LLAMA_LIKE, get_adapter
from optimum_fair.modeling import DreamConfig, DreamModel, LLaDAConfig, LLaDAModelLM


def _tiny(adapter):
    if adapter is LLADA:
        cfg = LLaDAConfig(d_model=32, n_heads=4, n_kv_heads=4, n_layers=2, mlp_hidden_size=48, vocab_size=64,
                          embedding_size=64, max_sequence_length=32, mask_token_id=63)
        return LLaDAModelLM(cfg)
    if adapter is DREAM:
        cfg = DreamConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=64, max_position_embeddings=32, mask_token_id=63)
        return DreamModel(cfg)
    from transformers import LlamaForCausalLM

    from tests.conftest import tiny_llama_config

    return LlamaForCausalLM(tiny_llama_config())


@pytest.mark.parametrize("adapter", [LLADA, DREAM, LLAMA_LIKE], ids=lambda a: a.name)
def test_every_name_resolves(adapter):
    model = _tiny(adapter)
    assert get_adapter(model) is adapter
    blocks = adapter.block_list(model)
    assert len(blocks) == 2
    for block in blocks:
        for name in adapter.linear_names():
            assert isinstance(block.get_submodule(name), nn.Linear), name
        # the groups cover every linear of the block exactly once
        linears = {n for n, m in block.named_modules() if isinstance(m, nn.Linear)}
        assert linears == set(adapter.linear_names())


@pytest.mark.parametrize("adapter", [LLADA, DREAM, LLAMA_LIKE], ids=lambda a: a.name)
def test_groups_follow_forward_order(adapter):
    model = _tiny(adapter)
    block = adapter.block_list(model)[0]
    order = []
    hooks = [block.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: order.append(n))
             for n in adapter.linear_names()]
    try:
        with torch.no_grad():
            model(torch.randint(0, 60, (1, 8)))
    finally:
        for h in hooks:
            h.remove()
    group_of = {n: i for i, g in enumerate(adapter.groups) for n in g}
    assert [group_of[n] for n in order] == sorted(group_of[n] for n in order)
    assert set(order) == set(adapter.linear_names())


def test_shared_group_inputs_are_identical():
    model = _tiny(LLADA)
    block = LLADA.block_list(model)[0]
    seen = {}
    hooks = [block.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: seen.__setitem__(n, a[0]))
             for n in LLADA.linear_names()]
    try:
        with torch.no_grad():
            model(torch.randint(0, 60, (1, 8)))
    finally:
        for h in hooks:
            h.remove()
    for group in LLADA.groups:
        for name in group[1:]:
            assert torch.equal(seen[name], seen[group[0]])


def test_unknown_model_type():
    class Cfg:
        model_type = "bert"

    with pytest.raises(ValueError, match="bert"):
        get_adapter(Cfg())


def test_mask_token_and_shift():
    assert LLADA.logit_shift == 0 and DREAM.logit_shift == 1
    model = _tiny(DREAM)
    assert DREAM.resolve_mask_token_id(model.config) == 63
    model.config.mask_token_id = None
    assert DREAM.resolve_mask_token_id(model.config) == 151666
    with pytest.raises(ValueError, match="mask_token_id"):
        LLAMA_LIKE.resolve_mask_token_id(_tiny(LLAMA_LIKE).config)
