"""The Monte-Carlo likelihood estimator against exact enumeration over mask counts and mask sets."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from scipy.integrate import quad

from optimum_fair.eval.likelihood import (
    MaskDraw,
    check_mc_settings,
    draw_losses,
    dream_masks,
    greedy_matches,
    llada_masks,
    mc_draws,
    mc_loglikelihood,
    stratified_counts,
)
from optimum_fair.modeling import DreamConfig, DreamModel
from tests.conftest import tiny_llada

VOCAB, MASK = 40, 39


@pytest.fixture(scope="module")
def llada():
    return tiny_llada(VOCAB, MASK)


@pytest.fixture(scope="module")
def dream():
    torch.manual_seed(1)
    cfg = DreamConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      mask_token_id=MASK, pad_token_id=0, bos_token_id=1, eos_token_id=1)
    model = DreamModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))  # sharper predictions than the init
    return model


def logits_fn(model):
    return lambda x: model(x).logits


def exact_expectation(model, ids, prompt_len, target_len, estimator, shift=0, cfg=0.0, eps=1e-3):
    """E[w * sum of masked CE] by enumerating every mask count and every mask set (float64)."""
    L, total = target_len, 0.0
    for m in range(1, L + 1):
        if estimator == "llada":  # k uniform on 1..L, then a uniform k-subset, weight L / k
            set_weight = (1 / L) * (L / m) / math.comb(L, m)
        else:  # P(S) / p = p^(m-1) (1-p)^(L-m), p = eps + (1 - eps) t, t ~ U(0, 1)
            set_weight = quad(lambda p, m=m: p ** (m - 1) * (1 - p) ** (L - m), eps, 1)[0] / (1 - eps)
        for subset in itertools.combinations(range(L), m):
            x = ids.clone()
            x[[prompt_len + j for j in subset]] = MASK
            with torch.no_grad():
                logits = model(x[None]).logits[0].double()  # (seq, vocab)
                if cfg:
                    un = x.clone()
                    un[:prompt_len] = MASK
                    un_logits = model(un[None]).logits[0].double()
                    logits = un_logits + (cfg + 1) * (logits - un_logits)
            logp = logits.log_softmax(-1)
            total += set_weight * sum(-float(logp[prompt_len + j - shift, ids[prompt_len + j]]) for j in subset)
    return total


def mean_and_se(model, ids, prompt_len, target_len, runs, **kw):
    """Grand mean of `runs` seeded estimates, and its standard error from the independent batch means."""
    draws = torch.cat([mc_draws(logits_fn(model), ids, prompt_len, target_len, mask_id=MASK,
                                generator=torch.Generator().manual_seed(seed), **kw) for seed in range(runs)])
    batch_means = draws.view(-1, kw["batch_size"]).mean(1)
    return float(draws.mean()), float(batch_means.std() / math.sqrt(batch_means.numel()))


IDS = torch.tensor([5, 9, 14, 3, 22, 7, 30, 11])


@pytest.mark.parametrize("batch_size,mc_num,runs", [(1, 16, 100), (2, 16, 100), (3, 15, 100), (4, 16, 100),
                                                    (5, 20, 80), (8, 16, 100)])
def test_llada_estimator_is_unbiased_for_any_batch(llada, batch_size, mc_num, runs):
    # prompt 4 tokens, target 3, a visible suffix of 1
    exact = exact_expectation(llada, IDS, 4, 3, "llada")
    mean, se = mean_and_se(llada, IDS, 4, 3, runs, mc_num=mc_num, batch_size=batch_size, estimator="llada")
    assert se < 0.03 * exact  # the bound below is tight enough to mean something
    assert abs(mean - exact) < 4 * se, (mean, exact, se)


@pytest.mark.parametrize("batch_size,mc_num", [(1, 16), (3, 12), (4, 16)])
def test_dream_estimator_is_unbiased_with_shifted_logits(dream, batch_size, mc_num):
    exact = exact_expectation(dream, IDS[:7], 3, 4, "dream", shift=1)
    mean, se = mean_and_se(dream, IDS[:7], 3, 4, 100, mc_num=mc_num, batch_size=batch_size,
                           estimator="dream", logit_shift=1)
    assert se < 0.05 * exact
    assert abs(mean - exact) < 4 * se, (mean, exact, se)


def test_cfg_matches_enumeration_with_guided_logits(llada):
    exact = exact_expectation(llada, IDS[:7], 4, 3, "llada", cfg=3.0)
    mean, se = mean_and_se(llada, IDS[:7], 4, 3, 60, mc_num=16, batch_size=4, estimator="llada", cfg=3.0)
    assert abs(mean - exact) < 4 * se, (mean, exact, se)
    assert abs(exact - exact_expectation(llada, IDS[:7], 4, 3, "llada")) > 8 * se  # guidance changes the score


def test_the_bound_can_fail(llada):
    # dropping the 1 / mask-ratio weight (a biased estimator) is caught by the same comparison
    exact = exact_expectation(llada, IDS, 4, 3, "llada")
    gen = torch.Generator().manual_seed(0)
    values = []
    for _ in range(240):
        draw = llada_masks(3, 4, gen)
        unweighted = MaskDraw(draw.masked, torch.ones(4, dtype=torch.float64))
        values.append(draw_losses(logits_fn(llada), IDS, 4, 3, unweighted, MASK))
    biased = torch.cat(values)
    se = float(biased.view(-1, 4).mean(1).std() / math.sqrt(240))
    assert abs(float(biased.mean()) - exact) > 10 * se


def test_stratified_counts_are_exactly_uniform_per_row():
    for target_len, batch in [(3, 2), (4, 3), (5, 2), (6, 4), (3, 7), (1, 3)]:
        rows = torch.stack([stratified_counts(target_len, batch, k0) for k0 in range(1, target_len + 1)])
        for i in range(batch):  # over k0 = 1..L, row i takes every count 1..L exactly once
            assert sorted(rows[:, i].tolist()) == list(range(1, target_len + 1))
    # the release's torch.round (half to even) is not: L = 3, b = 2 gives row 1 the counts {2, 1, 1}
    released = [int(((torch.round(torch.tensor(k0 + 1.5)) - 1) % 3) + 1) for k0 in (1, 2, 3)]
    assert sorted(released) == [1, 1, 2]
    assert stratified_counts(8, 4, 3).tolist() == [3, 5, 7, 1]  # k0 + 0, 2, 4, 6 wrapped: the release's grid


def test_masks_have_the_drawn_counts_and_rates():
    gen = torch.Generator().manual_seed(0)
    draw = llada_masks(10, 5, gen)
    counts = draw.masked.sum(1)
    assert torch.allclose(draw.weight, 10 / counts.double())
    assert sorted(((counts - counts[0]) % 10).tolist()) == [0, 2, 4, 6, 8]  # spread over the batch
    draw = dream_masks(4000, 4, gen, eps=1e-3)
    rates = 1 / draw.weight  # stratified: a quarter apart (mod 1, after the eps affine map)
    gaps = torch.diff(torch.sort((rates - 1e-3) / (1 - 1e-3)).values)
    assert torch.allclose(gaps, torch.full((3,), 0.25, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(draw.masked.double().mean(1), rates, atol=0.03)


def test_seeded_and_deterministic(llada):
    kw = dict(mask_id=MASK, mc_num=8, batch_size=4)
    a = mc_loglikelihood(logits_fn(llada), IDS, 4, 3, generator=torch.Generator().manual_seed(3), **kw)
    b = mc_loglikelihood(logits_fn(llada), IDS, 4, 3, generator=torch.Generator().manual_seed(3), **kw)
    c = mc_loglikelihood(logits_fn(llada), IDS, 4, 3, generator=torch.Generator().manual_seed(4), **kw)
    assert a == b and a != c and a < 0


def test_full_enumeration_of_a_one_token_target_is_exact(llada):
    # L = 1: the only mask is the whole target, weight 1: the estimate is exactly -CE, with no noise
    with torch.no_grad():
        x = IDS.clone()
        x[4] = MASK
        ce = -float(llada(x[None]).logits[0, 4].double().log_softmax(-1)[IDS[4]])
    got = mc_loglikelihood(logits_fn(llada), IDS, 4, 1, mask_id=MASK, mc_num=4, batch_size=2)
    assert got == pytest.approx(-ce, rel=1e-5)


def test_bad_settings_raise_naming_the_argument(llada):
    with pytest.raises(ValueError, match=r"mc_num \(10\) must be a multiple of batch_size \(4\)"):
        check_mc_settings(10, 4)
    with pytest.raises(ValueError, match="mc_num"):
        check_mc_settings(0, 1)
    with pytest.raises(ValueError, match="cfg"):
        check_mc_settings(4, 2, cfg=-1.0)
    with pytest.raises(ValueError, match="sampling_eps"):
        check_mc_settings(4, 2, eps=0.0)
    with pytest.raises(ValueError, match="mask token"):
        mc_draws(logits_fn(llada), torch.tensor([1, MASK, 3]), 1, 2, mask_id=MASK, mc_num=2, batch_size=2)
    with pytest.raises(ValueError, match="prompt_len must be an int >= logit_shift"):
        mc_draws(logits_fn(llada), IDS, 0, 3, mask_id=MASK, mc_num=2, batch_size=2, logit_shift=1)
    with pytest.raises(ValueError, match="estimator must be one of"):
        mc_draws(logits_fn(llada), IDS, 4, 3, mask_id=MASK, mc_num=2, batch_size=2, estimator="ar")


def test_greedy_check_follows_the_model(llada):
    # build the target the greedy procedure itself produces, then check it matches and a changed one does not
    x = IDS[:7].clone()
    x[4:7] = MASK
    with torch.no_grad():
        for _ in range(3):
            probs = llada(x[None]).logits[0, 4:7].softmax(-1)
            conf, tok = probs.max(-1)
            j = int(conf.masked_fill(x[4:7] != MASK, -1).argmax())
            x[4 + j] = tok[j]
    assert greedy_matches(logits_fn(llada), x, 4, 3, mask_id=MASK)
    other = x.clone()
    other[5] = (other[5] + 1) % MASK
    assert not greedy_matches(logits_fn(llada), other, 4, 3, mask_id=MASK)
