"""`generate`: tokenising, left padding, mask id and logit shift from the config, decoding."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from optimum_fair.arch import get_adapter
from optimum_fair.eval.generation import generate

WORDS = ["[PAD]", "[UNK]", "[MASK]", "a", "b", "c", "d", "e", "f", "g", "h"]
PAD, MASK = 0, 2


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = dict(pad_token="[PAD]", unk_token="[UNK]", mask_token="[MASK]")
    return PreTrainedTokenizerFast(tokenizer_object=core, **specials)


class TinyDLM(nn.Module):
    """One position-embedding layer: absolute position j predicts word a..h number (j + shift) % 8,
    emitted at j (LLaDA) or one position early (Dream, shift = 1). Records what it was called with."""

    def __init__(self, model_type: str, shift: int, mask_id: int | None = MASK) -> None:
        super().__init__()
        self.config = SimpleNamespace(mask_token_id=mask_id, model_type=model_type, vocab_size=len(WORDS))
        self.table = nn.Embedding(32, len(WORDS))
        with torch.no_grad():
            self.table.weight.zero_()
            for j in range(32):
                self.table.weight[j, 3 + (j + shift) % 8] = 4.0
        self.calls: list[tuple[torch.Tensor, torch.Tensor | None, bool]] = []

    def forward(self, input_ids, attention_mask=None):
        self.calls.append((input_ids.clone(), attention_mask, torch.is_grad_enabled()))
        positions = torch.arange(input_ids.shape[1])
        return SimpleNamespace(logits=self.table(positions).expand(input_ids.shape[0], -1, -1))


def test_logit_shift_comes_from_the_adapter():
    assert get_adapter(SimpleNamespace(model_type="Dream")).logit_shift == 1
    assert get_adapter(SimpleNamespace(model_type="dream")).logit_shift == 1
    assert get_adapter(SimpleNamespace(model_type="llada")).logit_shift == 0
    with pytest.raises(ValueError, match="No optimum-fair adapter"):
        get_adapter(SimpleNamespace())


def test_llada_single_prompt(tokenizer):
    model = TinyDLM("llada", shift=0)
    # prompt occupies positions 0-2, the answer 3-6 -> words 3..6 = d e f g
    assert generate(model, tokenizer, "a b c", gen_length=4, block_length=2) == "d e f g"
    assert len(model.calls) == 4 and model.calls[0][1] is None
    assert not any(grad for _, _, grad in model.calls)


def test_batch_is_left_padded_with_attention_mask(tokenizer):
    model = TinyDLM("llada", shift=0)
    texts, trace = generate(model, tokenizer, ["a b c", "d e"], gen_length=4, steps=2, return_trace=True)
    assert texts == ["d e f g", "d e f g"]
    ids, mask, _ = model.calls[0]
    assert ids[:, :3].tolist() == [[3, 4, 5], [PAD, 6, 7]]
    assert mask.tolist() == [[1] * 7, [0] + [1] * 6]
    assert (trace.prompt_len, trace.gen_len, trace.steps, trace.policy) == (3, 4, 2, "llada/low_confidence")


@pytest.mark.parametrize("alg", ["entropy", "maskgit_plus", "origin"])
def test_dream_reads_shifted_logits(tokenizer, alg):
    model = TinyDLM("Dream", shift=1)
    out = generate(model, tokenizer, ["a b c"], gen_length=4, algorithm="dream", alg=alg,
                   generator=torch.Generator().manual_seed(0))
    assert out == ["d e f g"]


def test_bad_arguments_raise_before_forward(tokenizer):
    model = TinyDLM("llada", shift=0, mask_id=None)
    with pytest.raises(ValueError, match="mask_token_id"):
        generate(model, tokenizer, "a b")
    model = TinyDLM("llada", shift=0)
    with pytest.raises(ValueError, match="algorithm"):
        generate(model, tokenizer, "a b", algorithm="gpt")
    with pytest.raises(ValueError, match="prompt"):
        generate(model, tokenizer, [])
    with pytest.raises(ValueError, match="block_length"):
        generate(model, tokenizer, "a b", gen_length=12, block_length=8)
    with pytest.raises(ValueError, match="prompt_ids"):
        generate(model, tokenizer, "a [MASK]")
    assert model.calls == []
