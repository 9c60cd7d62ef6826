"""The pipeline on Dream (shifted logits, GQA, biases) and on a Llama-like autoregressive model."""

import pytest
import torch
from transformers import AutoModel, LlamaForCausalLM

from optimum_fair import FairCalibConfig, FairLinear, calibration_result, quantize
from optimum_fair.modeling import DreamConfig, DreamModel
from tests.conftest import char_tokenizer, tiny_llama_config

SMALL = dict(num_probes=8, num_samples=8, seq_len=32, window=16, block_length=8, batch_size=4, epochs=2,
             dataset="lee")
X = torch.randint(4, 90, (2, 32), generator=torch.Generator().manual_seed(7))


def _dream(tok):
    torch.manual_seed(0)
    cfg = DreamConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=64,
                      mask_token_id=tok.mask_token_id, tie_word_embeddings=False)
    return DreamModel(cfg).eval()


def test_dream_prior_is_shifted_and_model_reloads(tmp_path):
    tok = char_tokenizer()
    model = _dream(tok)
    quantize(model, FairCalibConfig(**SMALL, rounding="gptq", transform="hadamard"), tokenizer=tok)
    w = calibration_result(model).prior.weights
    # the window's 16 predictions are made by hidden states 15..30; the last position predicts nothing
    assert w[-1] == 0.05 and w[:15].eq(0.05).all() and (w[15:31] > 0.05).all()
    assert sum(isinstance(m, FairLinear) for m in model.modules()) == 14
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    model.save_pretrained(tmp_path / "q")
    reloaded = AutoModel.from_pretrained(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(reloaded(X).logits, model(X).logits)


def test_llama_like_needs_a_mask_token_for_the_fair_prior():
    tok = char_tokenizer()
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=len(tok))).eval()
    with pytest.raises(ValueError, match="mask_token_id"):
        quantize(model, FairCalibConfig(**SMALL, rounding="gptq"), tokenizer=tok)
    quantize(model, FairCalibConfig(**SMALL, rounding="gptq", transform="hadamard", weighting="uniform"),
             tokenizer=tok)
    assert isinstance(model.model.layers[1].mlp.down_proj, FairLinear)
    assert [r["loss"] < r["loss_rtn"] for r in calibration_result(model).blocks] == [True, True]


def test_flatquant_calibrates_a_llama_like_model():
    # transformers 5's Llama passes a KV cache object to each layer; it used to grow across calibration
    # batches (later batches attended to earlier ones) and FlatQuant's backward hit the old graphs
    tok = char_tokenizer()
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=len(tok))).eval()
    quantize(model, FairCalibConfig(**SMALL, transform="flatquant", weighting="uniform"), tokenizer=tok)
    assert isinstance(model.model.layers[0].self_attn.q_proj, FairLinear)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in calibration_result(model).blocks)


def test_block_calls_carry_no_state_between_batches():
    from optimum_fair.devices import execution_device
    from optimum_fair.pipeline.stage2 import block_caller, capture_block_inputs

    model = LlamaForCausalLM(tiny_llama_config()).eval()
    hidden, extras = capture_block_inputs(model, model.model.layers, X, batch_size=1)
    call = block_caller(model.model.layers[0], extras, execution_device(model))
    with torch.no_grad():
        first, again = call(hidden[:1]), call(hidden[:1])
    assert torch.equal(first, again)


def test_defaults_fit_a_short_context_model(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    tok = char_tokenizer()
    # fair weighting needs masked rollouts: the error names `weighting` before any work
    with pytest.raises(ValueError, match="weighting='fair'.*weighting='uniform'"):
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=FairCalibConfig(
            rounding="rtn", tokenizer=tok, dataset="lee", num_samples=8))
    # with uniform weighting the unset seq_len / window / block_length fit the 64-position model
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=FairCalibConfig(
        rounding="rtn", weighting="uniform", tokenizer=tok, dataset="lee", num_samples=8, epochs=1))
    assert isinstance(model.model.layers[1].mlp.down_proj, FairLinear)


def test_unset_window_and_blocks_resolve_to_values_that_fit():
    cfg = FairCalibConfig()
    assert (cfg.resolved_window(64), cfg.resolved_block_length(16)) == (16, 16)  # one block of 16
    assert (cfg.resolved_window(1024), cfg.resolved_block_length(256)) == (256, 32)  # the paper's
    assert cfg.resolved_block_length(48) == 24  # the largest divisor <= 32
    assert FairCalibConfig(block_length=8).resolved_window(64) == 16
    with pytest.raises(ValueError, match="block_length"):
        FairCalibConfig(block_length=32).resolved_window(64)  # a set value that cannot fit is named


def test_corrected_inputs_refit_dreams_head_and_the_model_reloads(tmp_path):
    tok = char_tokenizer()
    model = _dream(tok)
    head = model.get_output_embeddings().weight.detach().clone()
    quantize(model, FairCalibConfig(**SMALL, rounding="gptq", transform="none", a_bits=16, weighting="uniform",
                                    input_mode="corrected"), tokenizer=tok)
    assert not torch.equal(model.get_output_embeddings().weight, head)  # refitted through Dream's own norm
    model.save_pretrained(tmp_path / "q")
    reloaded = AutoModel.from_pretrained(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(reloaded(X).logits, model(X).logits)


def test_corrected_inputs_leave_a_tied_head_alone(caplog):
    import logging

    tok = char_tokenizer()
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=len(tok), tie_word_embeddings=True)).eval()
    embedding = model.get_input_embeddings().weight.detach().clone()
    with caplog.at_level(logging.INFO, logger="optimum_fair"):
        quantize(model, FairCalibConfig(**SMALL, rounding="gptq", transform="none", a_bits=16, weighting="uniform",
                                        input_mode="corrected"), tokenizer=tok)
    assert "the LM head is not a float linear of its own; left as it is" in caplog.text
    assert torch.equal(model.get_input_embeddings().weight, embedding)
