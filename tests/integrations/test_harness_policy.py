"""The lm-eval backend's generate_until under a serving policy: threshold / factor / cache model_args (issue 34)."""

from __future__ import annotations

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from optimum_fair.integrations.harness import DiffusionLM  # noqa: E402
from optimum_fair.modeling.kv_cache import ApproximateCache  # noqa: E402
from optimum_fair.scoring.sampler import llada_decode  # noqa: E402
from tests.conftest import char_tokenizer, tiny_llada, tiny_llada2  # noqa: E402

MASK = 39  # the char tokenizer's "J": the texts avoid it


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def llada(tok):
    model = tiny_llada(len(tok), MASK)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30.0)  # confident: several commits per step
    return model


def answer(harness, gen):
    req = Instance(request_type="generate_until", doc={}, arguments=("abcdefgh", gen), idx=0)
    return harness.generate_until([req], disable_tqdm=True)[0]


@pytest.mark.parametrize("where", ["model_args", "generation_kwargs"])
def test_policy_reaches_the_sampler(llada, tok, where):
    policy = {"threshold": 0.5, "cache": "dual"}
    gen = {"until": ["\n"], "gen_length": 16, "steps": 16, "block_length": 8}
    harness = DiffusionLM(pretrained=llada, tokenizer=tok, batch_size=1, **(policy if where == "model_args" else {}))
    got = answer(harness, gen if where == "model_args" else {**gen, **policy})
    ids = torch.tensor([harness.tok_encode("abcdefgh")])
    with torch.no_grad():
        trace = llada_decode(lambda x, attention_mask=None: llada(x).logits, ids, 16, 8, 16, MASK, threshold=0.5,
                             cache=ApproximateCache(llada, "dual"))
    expected = tok.decode(trace.generated[0].tolist(), skip_special_tokens=False).split("\n")[0]
    for special in tok.all_special_tokens:
        expected = expected.replace(special, "")
    assert got == expected


def test_bad_policies_are_refused_by_name(llada, tok):
    with pytest.raises(ValueError, match="threshold must be in"):
        DiffusionLM(pretrained=llada, tokenizer=tok, threshold=1.5)
    with pytest.raises(ValueError, match="cache must be one of"):
        DiffusionLM(pretrained=llada, tokenizer=tok, cache="full")
    with pytest.raises(ValueError, match="cache='prefix': LLaDA2MoeModelLM has no approximate KV cache"):
        DiffusionLM(pretrained=tiny_llada2(len(tok), MASK), tokenizer=tok, cache="prefix")
    with pytest.raises(ValueError, match="threshold .* and factor .* give one"):
        answer(DiffusionLM(pretrained=llada, tokenizer=tok, threshold=0.5), {"factor": 1.0, "gen_length": 8})
