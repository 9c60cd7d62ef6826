"""Stage I rollouts on the prefix KV cache (issue 34, item 4): same commit order, approximate reliabilities."""

from __future__ import annotations

import pytest
import torch

from optimum_fair.modeling.kv_cache import ApproximateCache
from optimum_fair.scoring.prior import prior_from_rollouts, probe_rollouts, reliability_sum
from tests.conftest import tiny_llada

VOCAB, MASK = 40, 39
PROMPTS = torch.randint(3, MASK, (6, 8), generator=torch.Generator().manual_seed(5))


class ExactCache:
    """Windows sliced from a fresh full forward: the cached rollouts must then equal the plain ones."""

    mode = "prefix"

    def __init__(self, model):
        self.model = model

    def refresh(self, x, attention_mask):
        return self.model(x).logits

    def window(self, x, attention_mask, start, end):
        return self.model(x).logits[:, start:end]


def rollouts(model, cache=None, shift=0):
    fn = lambda x, **kw: model(x).logits  # noqa: E731
    return probe_rollouts(fn, PROMPTS, 16, 8, 16, MASK, shift, "prob", 4, torch.Generator().manual_seed(0),
                          cache=cache)


@pytest.mark.parametrize("shift", [0, 1])
def test_an_exact_cache_reproduces_the_rollouts(shift):
    model = tiny_llada(VOCAB, MASK)
    commit, rel = rollouts(model, shift=shift)
    c_commit, c_rel = rollouts(model, ExactCache(model), shift)
    assert torch.equal(commit, c_commit)
    masked = commit.unsqueeze(0) >= torch.arange(16).view(16, 1, 1)  # (T, P, K): read by reliability_sum
    assert torch.allclose(rel[masked], c_rel[masked], atol=1e-6)
    assert torch.allclose(reliability_sum(commit, rel), reliability_sum(c_commit, c_rel), atol=1e-5)


def test_prefix_cache_rollouts_keep_the_commit_order_and_a_close_prior():
    model = tiny_llada(VOCAB, MASK)
    commit, rel = rollouts(model)
    c_commit, c_rel = rollouts(model, ApproximateCache(model, "prefix"))
    assert torch.equal(commit, c_commit)  # the random commit order does not depend on the logits
    assert torch.equal(rel[0], c_rel[0])  # the first forward is exact (later tokens may differ: approximate logits)
    kw = dict(seq_len=24, steps=16, beta=1.0, schedule="early", lambda1=1 / 16, floor=0.05)
    exact, cached = prior_from_rollouts(commit, rel, **kw).weights, prior_from_rollouts(c_commit, c_rel, **kw).weights
    assert float((exact - cached).norm() / exact.norm()) < 0.01  # stated tolerance: 1 % relative L2


def test_a_dual_cache_is_refused_by_name():
    model = tiny_llada(VOCAB, MASK)
    with pytest.raises(ValueError, match="cache: Stage I rollouts read every masked position"):
        rollouts(model, ApproximateCache(model, "dual"))


@pytest.mark.parametrize("cached", [False, True])
def test_rollouts_under_the_serving_policy(cached):
    """threshold rollouts: the teacher's greedy threshold decode; its empty slots add no reliability."""
    from optimum_fair.scoring.sampler import llada_decode

    model = tiny_llada(VOCAB, MASK)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30.0)  # confident: blocks fill before their step budget
    fn = lambda x, **kw: model(x).logits  # noqa: E731
    cache = ApproximateCache(model, "prefix") if cached else None
    commit, rel = probe_rollouts(fn, PROMPTS, 16, 8, 16, MASK, 0, "prob", 4, cache=cache, threshold=0.5)
    with torch.no_grad():
        ref = llada_decode(fn, PROMPTS, 16, 8, 16, MASK, threshold=0.5,
                           cache=ApproximateCache(model, "prefix") if cached else None)
    assert torch.equal(commit, ref.commit_step) and rel.shape == (16, 6, 16)
    empty = ~(ref.commits_per_step() > 0).any(-1)  # (T,): no row commits, no forward
    assert empty.any() and (rel[empty] == 0).all() and (rel[~empty] > 0).any()
    kw = dict(seq_len=24, steps=16, beta=1.0, schedule="early", lambda1=1 / 16, floor=0.05)
    assert torch.isfinite(prior_from_rollouts(commit, rel, **kw).weights).all()
