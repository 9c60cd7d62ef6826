"""Released-style config.json files (with remote-code auto_map) load into the native classes."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

from optimum_fair.modeling import (
    DreamConfig,
    DreamModel,
    LLaDAConfig,
    LLaDAModelLM,
    register_native_models,
)

# Keys of the released GSAI-ML/LLaDA-8B config.json, with tiny shapes.
LLADA_RELEASED = {
    "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0, "architectures": ["LLaDAModelLM"],
    "attention_dropout": 0.0, "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
    "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig",
                 "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
                 "AutoModel": "modeling_llada.LLaDAModelLM"},
    "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama", "d_model": 32,
    "embedding_dropout": 0.0, "embedding_size": 64, "eos_token_id": 61, "flash_attention": False,
    "include_bias": False, "include_qkv_bias": False, "init_cutoff_factor": None, "init_device": "meta",
    "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False, "layer_norm_type": "rms",
    "layer_norm_with_affine": True, "mask_token_id": 62, "max_sequence_length": 64, "mlp_hidden_size": 48,
    "mlp_ratio": 4, "model_type": "llada", "multi_query_attention": None, "n_heads": 4, "n_kv_heads": 4,
    "n_layers": 2, "pad_token_id": 61, "precision": "amp_bf16", "residual_dropout": 0.0, "rms_norm_eps": 1e-05,
    "rope": True, "rope_full_precision": True, "rope_theta": 500000.0, "scale_logits": False,
    "transformers_version": "4.46.3", "use_cache": False, "vocab_size": 60, "weight_tying": False,
}

# Keys of the released Dream-org/Dream-v0-Base-7B config.json, with tiny shapes (dtype kept float32 here).
DREAM_RELEASED = {
    "architectures": ["DreamModel"], "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
    "bos_token_id": 61, "eos_token_id": 61, "hidden_act": "silu", "hidden_size": 32, "initializer_range": 0.02,
    "intermediate_size": 48, "mask_token_id": 62, "max_position_embeddings": 64, "max_window_layers": 2,
    "model_type": "Dream", "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2,
    "pad_token_id": 61, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0,
    "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "float32",
    "transformers_version": "4.46.2", "use_cache": False, "use_sliding_window": False, "vocab_size": 64,
}

POISON = "raise RuntimeError('remote code was executed')\n"


def write_release(tmp_path, config: dict, remote_files: list[str]) -> None:
    (tmp_path / "config.json").write_text(json.dumps(config))
    for name in remote_files:  # remote code that must never run
        (tmp_path / name).write_text(POISON)


def test_register_is_idempotent() -> None:
    register_native_models()
    register_native_models()
    assert AutoConfig.for_model("llada").__class__ is LLaDAConfig
    assert AutoConfig.for_model("Dream").__class__ is DreamConfig


@pytest.mark.parametrize(
    "released,config_cls,model_cls,remote",
    [(LLADA_RELEASED, LLaDAConfig, LLaDAModelLM, ["configuration_llada.py", "modeling_llada.py"]),
     (DREAM_RELEASED, DreamConfig, DreamModel, ["configuration_dream.py", "modeling_dream.py"])],
)
def test_released_config_loads_natively(tmp_path, released, config_cls, model_cls, remote) -> None:
    register_native_models()
    torch.manual_seed(0)
    native = model_cls(config_cls(**{k: v for k, v in released.items() if k not in ("auto_map", "model_type")}))
    native.eval().save_pretrained(tmp_path)
    write_release(tmp_path, released, remote)  # replace config.json by the released-style one
    config = AutoConfig.from_pretrained(tmp_path)
    assert type(config) is config_cls and config.mask_token_id == 62
    ids = torch.randint(0, 60, (1, 6))
    with torch.no_grad():
        expected = native(ids).logits
    for auto_cls in (AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM):
        loaded = auto_cls.from_pretrained(tmp_path).eval()
        assert type(loaded) is model_cls
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, expected)


def test_llada_released_values_kept() -> None:
    cfg = LLaDAConfig(**{k: v for k, v in LLADA_RELEASED.items() if k != "model_type"})
    assert cfg.rope_theta == 500000.0 and cfg.init_fn == "mitchell" and cfg.precision == "amp_bf16"
    assert cfg.auto_map["AutoModel"] == "modeling_llada.LLaDAModelLM"  # kept as data
    reloaded = LLaDAConfig.from_dict(cfg.to_dict())
    assert reloaded.to_dict() == cfg.to_dict()
