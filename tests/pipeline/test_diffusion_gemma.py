"""transformers' own DiffusionGemma through FAIR-Calib: fused experts quantized as linears, the encoder's
text layers sharing the decoder's packed modules, noisy-canvas calibration, exact reload."""

import functools
import logging

import pytest
import torch
from torch import nn
from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

from optimum_fair import FairCalibConfig, calibration_result, quantize
from optimum_fair.arch import DIFFUSION_GEMMA, get_adapter
from optimum_fair.modeling.experts import RoutedExperts
from optimum_fair.nn import FairLinear
from optimum_fair.pipeline.calibration import _canvas_inputs
from optimum_fair.pipeline.moe import unfuse_experts
from optimum_fair.pipeline.stage2 import block_caller, capture_block_inputs
from optimum_fair.scoring.states import noisy_canvases
from tests.conftest import char_tokenizer

TEXTS = [f"a diffusion gemma reads line {i} of the calibration text, then stops." for i in range(64)]
QUICK = dict(num_samples=8, seq_len=32, batch_size=4, w_bits=4, a_bits=16, transform="none")
FLOAT_OK = ("lm_head", "model.decoder.embed_tokens", "model.encoder.language_model.embed_tokens",
            "model.encoder.vision_tower", "model.encoder.embed_vision", "model.decoder.self_conditioning")


def tiny_gemma(seed: int = 0) -> DiffusionGemmaForBlockDiffusion:
    """2 text layers (sliding, full: the full one has no v_proj), 4 experts of which 2 per token."""
    torch.manual_seed(seed)
    text = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16, global_head_dim=16, num_experts=4, top_k_experts=2,
                moe_intermediate_size=16, max_position_embeddings=64, sliding_window=16,
                layer_types=["sliding_attention", "full_attention"])
    vision = dict(model_type="gemma4_vision", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=2, head_dim=16, position_embedding_size=64)
    return DiffusionGemmaForBlockDiffusion(DiffusionGemmaConfig(text_config=text, vision_config=vision,
                                                                canvas_length=8)).eval()


def _logits(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    ids, canvas = torch.randint(4, 100, (2, 6), generator=g), torch.randint(4, 100, (2, 8), generator=g)
    with torch.no_grad():
        return model(input_ids=ids, decoder_input_ids=canvas).logits


@pytest.fixture(scope="module")
def gptq():
    model = tiny_gemma()
    quantize(model, FairCalibConfig(rounding="gptq", **QUICK), texts=TEXTS, tokenizer=char_tokenizer())
    return model


def test_every_expert_is_packed_and_the_encoder_shares_the_decoder_modules(gptq):
    dec, enc = gptq.model.decoder.layers, gptq.model.encoder.language_model.layers
    for d, e in zip(dec, enc, strict=True):
        assert isinstance(d.experts, RoutedExperts) and e.experts is d.experts  # one object, both stacks
        assert all(isinstance(x.gate_up_proj, FairLinear) and isinstance(x.down_proj, FairLinear) for x in d.experts)
        assert e.self_attn.q_proj is d.self_attn.q_proj and e.mlp.down_proj is d.mlp.down_proj
        assert isinstance(d.router.proj, nn.Linear) and e.router.proj is not None  # routers float
    assert not hasattr(dec[1].self_attn.v_proj, "weight")  # the full-attention layer has none to quantize
    fair = {id(m) for m in gptq.modules() if isinstance(m, FairLinear)}
    assert len(fair) == 2 * (4 + 4 * 2 + 3) - 1  # per layer: q/k/(v)/o, 4 experts x 2, mlp x 3
    for name, t in gptq.state_dict().items():  # every weight matrix is packed or a listed float module
        if t.dim() >= 2 and not name.endswith(("weight_scale", "weight_packed")) and ".router." not in name:
            assert name.startswith(FLOAT_OK), name
    assert calibration_result(gptq).config.weighting.value == "uniform"
    assert [r["block"] for r in calibration_result(gptq).blocks] == [0, 1]


def test_calibration_replays_each_decoder_block_as_the_model_runs_it():
    # the captured arguments differ per block (sliding / full rotary tables and masks) and carry the
    # encoder's KV cache; replaying them reproduces the inputs of the next block in the real forward
    model = tiny_gemma()
    adapter = get_adapter(model)
    assert adapter is DIFFUSION_GEMMA
    unfuse_experts(model, adapter)
    blocks = adapter.block_list(model)
    canvas, prompt = torch.randint(4, 100, (4, 16), generator=torch.Generator().manual_seed(1)), torch.tensor([[2]])
    inputs = functools.partial(_canvas_inputs, prompt)
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, a, k: seen.append(a[0] if a else k["hidden_states"]),
                                         with_kwargs=True) for b in blocks]
    with torch.no_grad():
        model(**inputs(canvas))
        for h in hooks:
            h.remove()
        hidden, extras = capture_block_inputs(model, blocks, canvas, 2, inputs=inputs, keep_cache=True)
        torch.testing.assert_close(hidden, seen[0], atol=0, rtol=0)
        for start in (0, 2):  # both batches, from the first batch's arguments
            out = block_caller(blocks[0], functools.partial(extras, l=0), "cpu")(hidden[start:start + 2])
            torch.testing.assert_close(out, seen[1][start:start + 2], atol=1e-5, rtol=1e-5)
        own = block_caller(blocks[1], functools.partial(extras, l=1), "cpu")(seen[1][:2])
        other = block_caller(blocks[1], functools.partial(extras, l=0), "cpu")(seen[1][:2])
    assert (own - other).abs().max() > 1e-2  # block 0's arguments would be wrong for block 1


def test_uniform_weighting_is_used_and_the_reason_logged(caplog):
    with caplog.at_level(logging.WARNING, logger="optimum_fair"):
        quantize(tiny_gemma(), FairCalibConfig(rounding="gptq", weighting="fair", **QUICK), texts=TEXTS,
                 tokenizer=char_tokenizer())
    assert "starts from uniformly random tokens, not masks" in caplog.text


def test_quantized_forward_equals_the_float_model_with_dequantized_weights(gptq):
    ref = tiny_gemma()  # same seed: the float teacher; give it the packed weights, dequantized
    with torch.no_grad():
        for l, layer in enumerate(gptq.model.decoder.layers):
            target = ref.model.decoder.layers[l]
            for name, module in layer.named_modules():
                if isinstance(module, FairLinear) and not name.startswith("experts."):
                    target.get_submodule(name).weight.copy_(module.dequantized_weight().float())
            for e, expert in enumerate(layer.experts):  # the fused tensors (shared with the encoder)
                target.experts.gate_up_proj[e].copy_(expert.gate_up_proj.dequantized_weight().float())
                target.experts.down_proj[e].copy_(expert.down_proj.dequantized_weight().float())
    torch.testing.assert_close(_logits(gptq), _logits(ref), atol=1e-5, rtol=1e-4)


def test_save_and_reload_are_exact_and_store_the_shared_layers_once(gptq, tmp_path):
    from safetensors import safe_open

    gptq.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert not [k for k in keys if "language_model.layers" in k and k.endswith(("weight", "weight_scale"))]
    assert "model.decoder.layers.0.experts.3.down_proj.weight_scale" in keys
    again = DiffusionGemmaForBlockDiffusion.from_pretrained(tmp_path)
    enc, dec = again.model.encoder.language_model.layers, again.model.decoder.layers
    assert enc[0].experts is dec[0].experts and enc[1].self_attn.q_proj is dec[1].self_attn.q_proj
    a, b = gptq.state_dict(), again.state_dict()
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(_logits(gptq), _logits(again))


def test_an_unknown_expert_layout_is_refused_before_anything_is_quantized():
    model = tiny_gemma()
    del model.model.decoder.layers[1].experts.act_fn
    with pytest.raises(ValueError, match=r"model\.decoder\.layers\.1\.experts is a DiffusionGemmaTextExperts "
                                         r"without the fused expert layout"):
        quantize(model, FairCalibConfig(rounding="rtn", **QUICK))
    assert not any(isinstance(m, (FairLinear, RoutedExperts)) for m in model.modules())  # nothing changed


def test_untied_weights_are_refused():
    model = tiny_gemma()
    enc = model.model.encoder.language_model.layers[0].self_attn.q_proj
    enc.weight = nn.Parameter(enc.weight.detach().clone())
    with pytest.raises(ValueError, match=r"model\.encoder\.language_model\.layers\.0\.self_attn\.q_proj\.weight is "
                                         r"not the tensor"):
        quantize(model, FairCalibConfig(rounding="rtn", **QUICK))


def test_masked_calibration_inputs_are_refused():
    with pytest.raises(ValueError, match="denoises a canvas of random tokens"):
        quantize(tiny_gemma(), FairCalibConfig(rounding="gptq", calib_inputs="masked", weighting="uniform", **QUICK),
                 texts=TEXTS, tokenizer=char_tokenizer())


def test_noisy_canvases_replace_a_per_sample_fraction_by_uniform_tokens():
    ids = torch.full((6, 4000), 7)
    out = noisy_canvases(ids, 1000, torch.Generator().manual_seed(0))
    level = torch.rand(6, 1, generator=torch.Generator().manual_seed(0)).squeeze(1)  # the drawn noise levels
    changed = (out != 7).float().mean(1)
    torch.testing.assert_close(changed, level * (1 - 1 / 1000), atol=0.03, rtol=0)  # a random token may be 7
    assert int(out.max()) < 1000 and torch.equal(noisy_canvases(ids, 1000, torch.Generator().manual_seed(0)), out)


def test_its_own_generate_runs_on_the_quantized_model(gptq):
    ids = torch.randint(4, 100, (1, 6), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        out = gptq.generate(input_ids=ids, max_new_tokens=8, do_sample=False)
    assert out.sequences.shape == (1, 6 + 8) and torch.equal(out.sequences[:, :6], ids)
    assert int(out.sequences.max()) < 128


def test_from_pretrained_with_a_quantization_config_calibrates_and_reloads(tmp_path):
    src = tmp_path / "gemma"
    tiny_gemma().save_pretrained(src)
    char_tokenizer().save_pretrained(src)
    config = FairCalibConfig(rounding="gptq", dataset=TEXTS, **QUICK)
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(src, quantization_config=config)
    layers = model.model.decoder.layers
    assert isinstance(layers[0].experts[3].down_proj, FairLinear)
    assert model.model.encoder.language_model.layers[0].experts is layers[0].experts
    assert [r["block"] for r in calibration_result(model).blocks] == [0, 1]
    model.save_pretrained(tmp_path / "q")
    again = DiffusionGemmaForBlockDiffusion.from_pretrained(tmp_path / "q")
    assert torch.equal(_logits(model), _logits(again))
