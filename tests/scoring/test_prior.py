import math

import pytest
import torch

from optimum_fair.scoring.prior import (
    PositionPrior,
    boost,
    place_in_sequence,
    prior_from_rollouts,
    probe_rollouts,
    reliability,
    reliability_sum,
    saturation,
)


def _brute_force(commit_step, reliab, T, beta, lam1):
    """The two terms of the paper's section 2, as plain loops."""
    P, K = commit_step.shape
    w = [0.0] * K
    for p in range(P):
        for t in range(1, T + 1):
            masked = [i for i in range(K) if commit_step[p, i] >= t - 1]
            row_max = max(float(reliab[t - 1, p, i]) for i in masked) if masked else 1.0
            for i in range(K):
                if commit_step[p, i] == t - 1:
                    w[i] += 1 + beta * (1 - (t - 1) / (T - 1))
                if i in masked:
                    w[i] += lam1 * float(reliab[t - 1, p, i]) / row_max
    return torch.tensor(w) / P


def test_prior_terms_match_brute_force():
    g = torch.Generator().manual_seed(1)
    P, K, T = 3, 6, 6
    commit_step = torch.stack([torch.randperm(T, generator=g) for _ in range(P)])  # one commit per step
    reliab = torch.rand(T, P, K, generator=g)
    prior = prior_from_rollouts(commit_step, reliab, seq_len=10, steps=T, beta=1.5, schedule="early",
                                lambda1=0.3, floor=0.05)
    expected = _brute_force(commit_step, reliab, T, 1.5, 0.3)
    expected = expected / expected.mean()
    torch.testing.assert_close(prior.weights[-K:], expected)
    assert torch.all(prior.weights[:-K] == 0.05)
    assert prior.weights.min() >= 0.05
    assert math.isclose(float(prior.weights[-K:].mean()), 1.0, rel_tol=1e-6)


def test_boost_schedules():
    t = torch.arange(1, 5)
    torch.testing.assert_close(boost(t, 4, 1.0, "early"), torch.tensor([2.0, 5 / 3, 4 / 3, 1.0]))
    torch.testing.assert_close(boost(t, 4, 3.0, "late"), torch.tensor([1.0, 2.0, 3.0, 4.0]))
    torch.testing.assert_close(boost(t, 4, 3.0, "flat"), torch.ones(4))
    with pytest.raises(ValueError, match="schedule"):
        boost(t, 4, 1.0, "middle")


def test_reliability_kinds():
    probs = torch.tensor([[0.7, 0.2, 0.1, 0.0], [0.25, 0.25, 0.25, 0.25]])
    torch.testing.assert_close(reliability(probs, "prob"), torch.tensor([0.7, 0.25]))
    torch.testing.assert_close(reliability(probs, "margin"), torch.tensor([0.5, 0.0]))
    ent = reliability(probs, "neg_entropy")
    assert ent[1].abs() < 1e-5 and 0 < ent[0] < 1  # uniform has zero reliability
    with pytest.raises(ValueError, match="reliability"):
        reliability(probs, "confidence")


def test_dream_shift_moves_window_left():
    w = torch.tensor([1.0, 3.0])
    out = place_in_sequence(w, 5, 0.1, logit_shift=1)
    torch.testing.assert_close(out, torch.tensor([0.1, 0.1, 0.5, 1.5, 0.1]))


def test_probe_rollouts_with_fixed_logits():
    vocab, mask_id, K = 8, 7, 4
    torch.manual_seed(0)
    table = torch.randn(vocab, vocab)

    def logits_fn(x):
        return table[x]  # (b, seq, vocab): depends on the token at each position

    prompts = torch.randint(0, 7, (5, 3))
    g = torch.Generator().manual_seed(0)
    commit, rel = probe_rollouts(logits_fn, prompts, K, 2, 4, mask_id, 0, "prob", batch_size=2, generator=g)
    assert commit.shape == (5, K) and rel.shape == (4, 5, K)
    # one commit per step, inside semi-AR blocks of 2: positions 0-1 at steps 0-1, 2-3 at steps 2-3
    assert torch.equal(commit.sort(-1).values, torch.arange(4).expand(5, 4))
    assert (commit[:, :2] < 2).all() and (commit[:, 2:] >= 2).all()
    # reliability at a masked position = max prob of the mask row without the mask token
    p = table[mask_id].softmax(-1)
    p[mask_id] = 0
    torch.testing.assert_close(rel[0, 0], (p / p.sum()).max().expand(K))
    g2 = torch.Generator().manual_seed(0)
    again, _ = probe_rollouts(logits_fn, prompts, K, 2, 4, mask_id, 0, "prob", batch_size=5, generator=g2)
    assert again.shape == commit.shape


def test_save_load_and_compatibility(tmp_path):
    prior = PositionPrior(torch.tensor([0.05, 0.9, 1.1]), 2, 0.05, {"block_length": 32, "steps": 64})
    prior.save(tmp_path / "p")
    loaded = PositionPrior.load(tmp_path / "p")
    assert torch.equal(loaded.weights, prior.weights) and loaded.settings == prior.settings
    loaded.check_compatible({"block_length": 32})
    with pytest.raises(ValueError, match="block_length: prior has 32, run wants 16"):
        loaded.check_compatible({"block_length": 16})
    loaded.check_compatible({"block_length": 16}, strict=False)  # warns only
    with pytest.raises(ValueError, match="prior.safetensors not found"):
        PositionPrior.load(tmp_path)


def test_saturation_zero_for_identical_halves():
    commit = torch.tensor([[0, 1, 2, 3]] * 4)
    rel = torch.ones(4, 4, 4)
    kw = dict(seq_len=6, steps=4, beta=1.0, schedule="early", lambda1=0.25, floor=0.05)
    assert saturation(commit, reliability_sum(commit, rel), **kw) == 0.0
    commit2 = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3], [3, 2, 1, 0], [3, 2, 1, 0]])
    assert saturation(commit2, reliability_sum(commit2, rel), **kw) > 0.01


def test_ablation_terms():
    g = torch.Generator().manual_seed(2)
    commit = torch.stack([torch.randperm(6, generator=g) for _ in range(4)])
    rel = torch.rand(6, 4, 6, generator=g)
    kw = dict(seq_len=8, steps=6, beta=1.0, schedule="early", floor=0.05)
    frontier_only = prior_from_rollouts(commit, rel, lambda1=0.0, **kw).weights[-6:]
    expected = boost(commit + 1, 6, 1.0, "early").mean(0)
    torch.testing.assert_close(frontier_only, expected / expected.mean())
    rel_only = prior_from_rollouts(commit, rel, lambda1=0.5, frontier_weight=0.0, **kw).weights[-6:]
    both = prior_from_rollouts(commit, rel, lambda1=0.5, **kw).weights[-6:]
    assert not torch.allclose(rel_only, both) and not torch.allclose(frontier_only, both)
    with pytest.raises(ValueError, match="not both 0"):
        prior_from_rollouts(commit, rel, lambda1=0.0, frontier_weight=0.0, **kw)
