"""Mixture-of-experts calibration on a tiny LLaDA-MoE: expert Hessians from routed tokens, the fallback for
experts that see too few tokens, float routers, every expert tensor accounted for, exact reload."""

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel

from optimum_fair import FairCalibConfig, quantize
from optimum_fair.arch import LLADA_MOE, get_adapter
from optimum_fair.calib import CalibLinear, TransformParams
from optimum_fair.distributed import DataShard, World
from optimum_fair.masks import block_diffusion_mask
from optimum_fair.modeling import register_native_models
from optimum_fair.nn import FairLinear
from optimum_fair.pipeline.calibration import calibrate
from optimum_fair.pipeline.stats import counted_hessians
from optimum_fair.scoring.sampler import llada_decode
from tests.conftest import char_tokenizer, tiny_llada2, tiny_lladamoe

TEXTS = [f"a tiny mixture of experts reads line {i} of the calibration text, then stops." for i in range(64)]
SMALL = dict(num_probes=8, num_samples=8, seq_len=32, window=16, block_length=8, batch_size=4,
             compute_dtype="float32", w_bits=4, a_bits=16, transform="none")


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def _model(tok, **kw):
    return tiny_lladamoe(len(tok), tok.mask_token_id, **kw)


def _plain(d: int) -> TransformParams:
    return TransformParams(d, kron="none", act_clip=False, trainable=False)


def test_adapter_groups_cover_every_linear_of_each_block_but_the_router(tok):
    model = _model(tok)
    assert get_adapter(model) is LLADA_MOE
    for l, block in enumerate(LLADA_MOE.block_list(model)):
        grouped = [n for g in LLADA_MOE.block_groups(block) for n in g]
        linears = {n for n, m in block.named_modules() if isinstance(m, nn.Linear)}
        assert len(grouped) == len(set(grouped))
        assert linears - set(grouped) == (set() if l == 0 else {"mlp.gate"})
    assert len(LLADA_MOE.block_groups(LLADA_MOE.block_list(model)[1])) == 2 + 8 * 2 + 2  # attn, experts, shared


def test_expert_hessians_use_exactly_the_routed_tokens_and_their_weights(tok):
    block = LLADA_MOE.block_list(_model(tok))[1]
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(4, 16, 64, generator=g), torch.rand(4, 16, generator=g)  # (n, seq, d), (n, seq)
    firsts = [f"mlp.experts.{e}.{n}" for e in range(8) for n in ("gate_proj", "down_proj")]
    calibs = [CalibLinear(block.get_submodule(n), _plain(block.get_submodule(n).in_features), 4, 16) for n in firsts]
    with torch.no_grad():
        H, counts = counted_hessians(block, firsts, calibs, block, x, w, DataShard(World(), 4, 2))
        seen = {}
        hook = block.mlp.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
        block(x)
        hook.remove()
        xf, wf = seen["x"].reshape(-1, 64), w.reshape(-1)  # (T, d), (T,)
        _, index = block.mlp.route(xf)
    for e in range(8):
        rows = (index == e).any(-1)  # brute force: the tokens whose top-k holds e
        expert = block.mlp.experts[e]
        x_e = xf[rows].double()
        inner = (F.silu(expert.gate_proj(xf[rows])) * expert.up_proj(xf[rows])).double()
        for i, inp in ((2 * e, x_e), (2 * e + 1, inner)):
            ref = (inp * wf[rows].double()[:, None]).T @ inp / int(rows.sum())
            assert counts[i] == int(rows.sum())
            torch.testing.assert_close(H[i], ref, rtol=1e-5, atol=1e-7)
    assert sum(counts[::2]) == 4 * 16 * 2  # every token reaches k = 2 experts


def test_an_expert_without_tokens_falls_back_to_rtn_and_the_count_is_logged(tok, caplog):
    model = _model(tok, moe_router_enable_expert_bias=True)
    with torch.no_grad():
        model.model.layers[1].mlp.expert_bias[7] = -1.0  # probabilities are <= 1: expert 7 never wins
    floats = {n: model.get_submodule(f"model.layers.1.mlp.experts.{n}").weight.clone()
              for n in ("7.up_proj", "7.down_proj", "3.up_proj")}
    cfg = FairCalibConfig(rounding="gptq", weighting="uniform", **SMALL)
    with caplog.at_level(logging.INFO, logger="optimum_fair"):
        calibrate(model, cfg, texts=TEXTS, tokenizer=tok)
    assert "mlp.experts.7.gate_proj: 0 calibration tokens for 64 inputs: round-to-nearest" in caplog.text
    assert "mlp.experts.7.down_proj: 0 calibration tokens for 32 inputs: round-to-nearest" in caplog.text
    for name, weight in floats.items():
        packed = model.get_submodule(f"model.layers.1.mlp.experts.{name}")
        rtn = FairLinear.from_linear(_linear(weight), 4, 16, -1)
        # the unrouted expert holds round-to-nearest codes; a routed one GPTQ's, which differ from them
        assert torch.equal(packed.codes(), rtn.codes()) == name.startswith("7.")


def test_corrected_inputs_round_dense_groups_towards_fp_and_experts_on_the_quantized_stream(tok, caplog):
    """input_mode="corrected" on LLaDA-MoE: the attention and shared groups of a MoE layer round towards the
    FP block (other codes than "quantized"), each routed expert as under "quantized" (routing differs between
    the two streams), said in the log."""
    runs = {}
    for mode in ("quantized", "corrected"):
        model = _model(tok)
        with caplog.at_level(logging.INFO, logger="optimum_fair"):
            calibrate(model, FairCalibConfig(rounding="gptq", weighting="uniform", input_mode=mode, **SMALL),
                      texts=TEXTS, tokenizer=tok)
        runs[mode] = model
    assert "corrected inputs: 16 routed-expert groups rounded on the quantized stream alone" in caplog.text  # 8 x 2
    codes = {mode: m.get_submodule("model.layers.1.self_attn.o_proj").codes() for mode, m in runs.items()}
    assert not torch.equal(codes["quantized"], codes["corrected"])


def _linear(weight: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight = nn.Parameter(weight)
    return linear


FAMILIES = {  # family: (tiny model, FairLinears expected, nn.Linear kept float, 2-D float params outside Linear)
    "lladamoe": (tiny_lladamoe, 7 + 2 * (4 + 8 * 3 + 3), {"lm_head", "model.layers.1.mlp.gate",
                                                          "model.layers.2.mlp.gate"}, set()),
    "llada2": (tiny_llada2, 5 + 2 * (2 + 8 * 3 + 3), {"lm_head"}, {"model.layers.1.mlp.gate.weight",
                                                                 "model.layers.2.mlp.gate.weight"}),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def quantized(request, tmp_path_factory, tok):
    """A tiny MoE model on disk, and it quantized through from_pretrained with FAIR weighting and GPTQ."""
    register_native_models()
    src = tmp_path_factory.mktemp(request.param)
    FAMILIES[request.param][0](len(tok), tok.mask_token_id).save_pretrained(src)
    tok.save_pretrained(src)
    cfg = FairCalibConfig(rounding="gptq", weighting="fair", dataset=TEXTS, **SMALL)
    return request.param, src, AutoModel.from_pretrained(src, quantization_config=cfg)


def test_from_pretrained_quantizes_every_expert_and_keeps_routers_float(quantized):
    family, _, model = quantized
    _, n_fair, float_linears, float_params = FAMILIES[family]
    fair = {n for n, m in model.named_modules() if isinstance(m, FairLinear)}
    assert {n for n, m in model.named_modules() if isinstance(m, nn.Linear)} == float_linears
    assert len(fair) == n_fair  # dense layer; MoE layers: attention, 8 experts, shared expert
    # every weight tensor of two or more dimensions is packed or one of the float modules listed above
    for name, t in model.state_dict().items():
        if t.dim() >= 2 and not name.endswith(("weight_scale", "weight_packed")):
            owner = name.rsplit(".", 1)[0]
            assert owner in float_linears | {"model.embed_tokens", "model.word_embeddings"} or name in float_params
    assert model.config.quantization_config.modules_to_not_convert == ["lm_head", "mlp.gate"]
    assert model.config.quantization_config.weighting.value == "fair"


def test_quantized_moe_forward_equals_the_dequantized_reference(quantized, tok):
    _, src, model = quantized
    ref = AutoModel.from_pretrained(src)  # float model; every converted linear gets its dequantized weight
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, FairLinear):
                ref.get_submodule(name).weight.copy_(module.dequantized_weight().float())
        ids = torch.randint(4, len(tok), (2, 24), generator=torch.Generator().manual_seed(5))
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=1e-5, rtol=1e-4)


def test_packed_experts_save_and_reload_exactly(quantized, tmp_path, tok):
    _, _, model = quantized
    model.save_pretrained(tmp_path)
    again = AutoModel.from_pretrained(tmp_path)
    a, b = model.state_dict(), again.state_dict()
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.randint(4, len(tok), (1, 20), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


def test_llada2_teacher_forwards_use_the_block_causal_mask(tok):
    # Stage I rollouts and Stage II's captured block inputs both attend under blocks of block_length (8)
    model = tiny_llada2(len(tok), tok.mask_token_id)
    seen = []
    hook = model.model.layers[0].register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs.get("attention_mask")), with_kwargs=True)
    calibrate(model, FairCalibConfig(rounding="rtn", weighting="fair", **dict(SMALL, transform="hadamard")),
              texts=TEXTS, tokenizer=tok)
    hook.remove()
    assert len(seen) > 8 and all(m is not None and m.dtype == torch.bool for m in seen)
    assert all(torch.equal(m, block_diffusion_mask(m.shape[-1], 8)) for m in seen)
    assert {m.shape[-1] for m in seen} == {32}


def test_llada2_probe_prompt_must_fill_whole_blocks(tok):
    model = tiny_llada2(len(tok), tok.mask_token_id)
    with pytest.raises(ValueError, match="probe prompt seq_len - window = 20 must be a multiple of it"):
        calibrate(model, FairCalibConfig(rounding="gptq", weighting="fair", **dict(SMALL, window=12, block_length=6)),
                  texts=TEXTS, tokenizer=tok)


def test_moe_models_decode_with_commit_traces(quantized, tok):
    _, _, model = quantized
    prompt = torch.tensor([tok.encode("experts ")])
    with torch.no_grad():
        trace = llada_decode(lambda x: model(x).logits, prompt, gen_length=8, block_length=4, steps=4,
                             mask_id=tok.mask_token_id)
    assert not (trace.sequences == tok.mask_token_id).any()
    assert sorted(trace.commit_step[0].tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]  # 2 commits per step


def test_compressed_tensors_export_holds_every_expert(quantized, tmp_path, tok):
    # the consumer reads it: transformers + compressed-tensors, no optimum-fair layer inside
    from transformers import CompressedTensorsConfig

    from optimum_fair.export import export

    family, _, model = quantized
    model.save_pretrained(tmp_path / "saved")
    out = export(tmp_path / "saved", tmp_path / "ct", "compressed-tensors")
    loaded = AutoModel.from_pretrained(out, dtype=torch.float32,
                                       quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
    assert not any(isinstance(m, FairLinear) for m in loaded.modules())
    fair = {n: m for n, m in model.named_modules() if isinstance(m, FairLinear)}
    assert any(".experts.7." in n for n in fair)
    for name, layer in fair.items():
        assert torch.equal(loaded.get_submodule(name).weight.float(), layer.dequantized_weight().float()), name
    router = "model.layers.1.mlp.gate"
    assert torch.equal(loaded.get_submodule(router).weight, model.get_submodule(router).weight)  # float
    compressed = AutoModel.from_pretrained(out, dtype=torch.float32).eval()  # runs the compressed layers
    ids = torch.randint(4, len(tok), (1, 16), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        torch.testing.assert_close(compressed(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-4)


def test_gguf_of_llada_moe_stacks_each_layers_experts_and_dequantizes_to_our_weights(tmp_path):
    # the consumer reads it: gguf's reader and dequantizer; experts as llama.cpp's 3-D ffn_*_exps
    import gguf
    from transformers import AutoTokenizer

    import optimum_fair
    from optimum_fair.export import export

    tok = AutoTokenizer.from_pretrained(optimum_fair.DEFAULT_MODEL)  # byte-level BPE, as GGUF needs
    model = tiny_lladamoe(len(tok), tok.mask_token_id, moe_layer_freq=[1, 1, 1],
                          shared_expert_intermediate_size=None, expert_intermediate_size=64).half()
    quantize(model, FairCalibConfig(rounding="rtn", transform="none", weighting="uniform", w_bits=4, a_bits=16,
                                    group_size=32), tokenizer=tok)
    model.save_pretrained(tmp_path / "q")
    tok.save_pretrained(tmp_path / "q")
    out = export(tmp_path / "q", tmp_path / "m.gguf", "gguf")
    reader = gguf.GGUFReader(str(out))
    tensors = {t.name: t for t in reader.tensors}
    assert reader.fields["general.architecture"].contents() == "llada-moe"
    assert reader.fields["llada-moe.expert_count"].contents() == 8
    assert reader.fields["llada-moe.expert_used_count"].contents() == 2
    for l in range(3):
        experts = model.model.layers[l].mlp.experts
        for w, gname in (("gate_proj", "ffn_gate_exps"), ("up_proj", "ffn_up_exps"), ("down_proj", "ffn_down_exps")):
            t = tensors[f"blk.{l}.{gname}.weight"]
            assert t.tensor_type.name == "Q4_0"
            layers = [getattr(experts[e], w) for e in range(8)]
            ours = torch.stack([x.codes().float() * x.weight_scale.float().repeat_interleave(32, dim=1)
                                for x in layers])  # (E, out, in), exact in fp32
            assert torch.equal(torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type)).reshape(ours.shape),
                               ours)
        router = tensors[f"blk.{l}.ffn_gate_inp.weight"]
        assert torch.equal(torch.from_numpy(router.data.copy()).float(), model.model.layers[l].mlp.gate.weight.float())
    assert not any(".experts." in n for n in tensors)  # nothing per expert
    with pytest.raises(ValueError, match="shared_expert_intermediate_size: llama.cpp's llada-moe has no shared"):
        shared = tiny_lladamoe(len(tok), tok.mask_token_id, moe_layer_freq=[1, 1, 1], expert_intermediate_size=64,
                               shared_expert_intermediate_size=64)
        quantize(shared, FairCalibConfig(rounding="rtn", transform="none", weighting="uniform", w_bits=4, a_bits=16,
                                         group_size=32), tokenizer=tok)
        export(shared, tmp_path / "s.gguf", "gguf", tokenizer=tok)


def test_flatquant_learns_a_transform_per_expert_and_reloads(tok, tmp_path):
    register_native_models()
    src = tmp_path / "src"
    tiny_lladamoe(len(tok), tok.mask_token_id).save_pretrained(src)
    tok.save_pretrained(src)
    cfg = FairCalibConfig(rounding="rtn", weighting="uniform", dataset=TEXTS, epochs=1,
                          **dict(SMALL, transform="flatquant", a_bits=4))
    model = AutoModel.from_pretrained(src, quantization_config=cfg)
    experts = model.model.layers[1].mlp.experts
    a, b = experts[0].gate_proj, experts[1].gate_proj
    assert a.has_online_transform and not torch.equal(a.transform_a, b.transform_a)  # each expert its own
    assert torch.equal(a.transform_a, experts[0].up_proj.transform_a)  # shared inside the expert's group
    model.save_pretrained(tmp_path / "q")
    again = AutoModel.from_pretrained(tmp_path / "q")
    ids = torch.randint(4, len(tok), (1, 16), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
