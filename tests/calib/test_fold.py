"""The folded residual rotation (issue 31 item 5): the same function in float, unit norm gains."""

from __future__ import annotations

import pytest
import torch

from optimum_fair.arch import get_adapter
from optimum_fair.calib.fold import fold_rotation, residual_rotation
from tests.conftest import char_tokenizer, tiny_dream, tiny_llada


def _fold(model, Q):
    adapter = get_adapter(model)
    blocks = list(adapter.block_list(model))
    fold_rotation(model, blocks, [adapter.block_groups(b) for b in blocks], Q)


def _with_random_gains(model):
    g = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if "norm" in name or name.endswith("ln_f.weight"):
            p.data = (torch.rand(p.shape, generator=g, dtype=torch.float64) + 0.5).to(p.dtype)
        elif name.endswith("bias"):
            p.data = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * 0.1
    return model


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("d_seed", [0, 1])
def test_folded_rotation_keeps_the_function_and_unit_gains(family, d_seed):
    tok = char_tokenizer()
    build = tiny_llada if family == "llada" else tiny_dream
    model = build(len(tok), tok.mask_token_id).double()
    model = _with_random_gains(model)
    ids = torch.randint(4, len(tok), (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(ids).logits
    Q = residual_rotation(64, torch.Generator().manual_seed(d_seed))
    _fold(model, Q)
    with torch.no_grad():
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)  # RMSNorm takes its statistic in float32
    gains = [p for n, p in model.named_parameters() if "norm" in n or n.endswith("ln_f.weight")]
    assert gains and all(torch.equal(p, torch.ones_like(p)) for p in gains)
    emb = model.get_input_embeddings().weight
    assert not torch.allclose(emb, emb @ Q.T)  # the stream is really rotated


@pytest.mark.parametrize("d", [64, 96])
def test_residual_rotation_is_orthogonal(d):
    Q = residual_rotation(d, torch.Generator().manual_seed(0))
    torch.testing.assert_close(Q @ Q.T, torch.eye(d, dtype=Q.dtype), rtol=0, atol=1e-6)


def test_a_tied_head_is_refused_before_anything_changes():
    from optimum_fair.modeling import LLaDAConfig, LLaDAModelLM

    tok = char_tokenizer()
    cfg = LLaDAConfig(d_model=64, n_heads=4, n_kv_heads=4, n_layers=1, mlp_hidden_size=96, vocab_size=len(tok),
                      embedding_size=len(tok), max_sequence_length=64, mask_token_id=tok.mask_token_id,
                      weight_tying=True)
    model = LLaDAModelLM(cfg).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="tied to the embedding"):
        _fold(model, residual_rotation(64, torch.Generator().manual_seed(0)))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_fold_rotation_config_calibrates_the_same_function():
    from optimum_fair import FairCalibConfig, quantize

    tok = char_tokenizer()
    teacher = _with_random_gains(tiny_llada(len(tok), tok.mask_token_id)).float()
    model = _with_random_gains(tiny_llada(len(tok), tok.mask_token_id)).float()
    ids = torch.randint(4, len(tok), (2, 24), generator=torch.Generator().manual_seed(2))
    quantize(model, FairCalibConfig(fold_rotation=True, rounding="rtn", transform="none", weighting="uniform",
                                    w_bits=8, a_bits=16), tokenizer=tok)
    gains = [p for n, p in model.named_parameters() if "norm" in n or n.endswith("ln_f.weight")]
    assert gains and all(torch.equal(p, torch.ones_like(p)) for p in gains)
    with torch.no_grad():
        ref, got = teacher(ids).logits, model(ids).logits
    assert (got - ref).abs().max() < 0.02 * ref.abs().max()  # int8 rounding of the rotated weights only
    assert FairCalibConfig.from_dict(FairCalibConfig(fold_rotation=True).to_dict()).fold_rotation is True


def test_a_failed_calibration_gives_the_unrotated_weights_back():
    from optimum_fair import FairCalibConfig, quantize

    tok = char_tokenizer()
    model = _with_random_gains(tiny_llada(len(tok), tok.mask_token_id)).float()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="token"):  # far too little text for the windows
        quantize(model, FairCalibConfig(fold_rotation=True, gguf_type="Q4_0", rounding="gptq", weighting="uniform",
                                        num_samples=4, seq_len=32), texts=["too short"], tokenizer=tok)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
