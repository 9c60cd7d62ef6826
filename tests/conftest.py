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
