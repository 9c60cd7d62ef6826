"""Shared fixtures: one torch thread, fixed seeds, a tiny random Llama on disk."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def device():
    return torch.device("cpu")


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=100, max_position_embeddings=64)
    kw.update(overrides)
    return LlamaConfig(**kw)


@pytest.fixture
def tiny_llama():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()


@pytest.fixture
def tiny_llama_dir(tmp_path, tiny_llama):
    path = tmp_path / "tiny-llama"
    tiny_llama.save_pretrained(path)
    return path


def char_tokenizer():
    """A character-level fast tokenizer with mask/eos/pad tokens, built in memory (no files, no network)."""
    import string

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = list(string.ascii_letters + string.digits + string.punctuation + " \n")
    vocab = {c: i for i, c in enumerate(["<unk>", "<|eos|>", "<|pad|>", "<|mask|>"] + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|eos|>",
                                   pad_token="<|pad|>", mask_token="<|mask|>")


def tiny_llada(vocab_size: int, mask_token_id: int, n_layers: int = 2, seed: int = 0):
    from optimum_fair.modeling import LLaDAConfig, LLaDAModelLM

    torch.manual_seed(seed)
    cfg = LLaDAConfig(d_model=64, n_heads=4, n_kv_heads=4, n_layers=n_layers, mlp_hidden_size=96,
                      vocab_size=vocab_size, embedding_size=vocab_size, max_sequence_length=64,
                      mask_token_id=mask_token_id, weight_tying=False)
    return LLaDAModelLM(cfg).eval()


@pytest.fixture
def tok():
    return char_tokenizer()


@pytest.fixture
def llada(tok):
    return tiny_llada(len(tok), tok.mask_token_id)


def tiny_dream(vocab_size: int, mask_token_id: int, seed: int = 0, **overrides):
    from optimum_fair.modeling import DreamConfig, DreamModel

    torch.manual_seed(seed)
    fields = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=64,
                  mask_token_id=mask_token_id, tie_word_embeddings=False)
    return DreamModel(DreamConfig(**{**fields, **overrides})).eval()


def tiny_lladamoe(vocab_size: int, mask_token_id: int, seed: int = 0, **overrides):
    """3 layers (the first dense, moe_layer_freq [0, 1, 1]), 8 experts of which 2 per token, a shared expert."""
    from optimum_fair.modeling import LLaDAMoEConfig, LLaDAMoEModelLM

    torch.manual_seed(seed)
    kw = dict(vocab_size=vocab_size, hidden_size=64, dense_intermediate_size=96, expert_intermediate_size=32,
              shared_expert_intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              num_experts=8, num_experts_per_tok=2, moe_layer_freq=[0, 1, 1], max_position_embeddings=64,
              pad_token_id=2, eos_token_id=1, mask_token_id=mask_token_id)
    kw.update(overrides)
    return LLaDAMoEModelLM(LLaDAMoEConfig(**kw)).eval()


def tiny_llada2(vocab_size: int, mask_token_id: int, seed: int = 0, **overrides):
    """3 layers (the first dense), 8 experts in 4 groups (2 groups, then 2 experts per token), one shared expert."""
    from optimum_fair.modeling import LLaDA2MoeConfig, LLaDA2MoeModelLM

    torch.manual_seed(seed)
    kw = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, moe_intermediate_size=16,
              num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, num_experts=8, num_shared_experts=1,
              num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1, max_position_embeddings=64,
              pad_token_id=2, eos_token_id=1, mask_token_id=mask_token_id)
    kw.update(overrides)
    return LLaDA2MoeModelLM(LLaDA2MoeConfig(**kw)).eval()
