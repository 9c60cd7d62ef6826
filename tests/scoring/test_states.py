"""Decode-like Stage II inputs (`scoring.states.decoding_states`), checked row by row in plain Python."""

import pytest
import torch

from optimum_fair.scoring.states import decoding_states

MASK = 99


def _rows(seq=12, n=200):
    return torch.arange(n * seq).reshape(n, seq) % 50  # no mask token in the text


@pytest.mark.parametrize("window,block,steps", [(8, 4, 8), (8, 4, 4), (8, 8, 4), (6, 2, 6)])
def test_states_follow_the_semi_autoregressive_commit_policy(window, block, steps):
    ids = _rows()
    states, weights = decoding_states(ids, window, block, steps, MASK, torch.Generator().manual_seed(0))
    seq, per_block = ids.shape[1], steps // (window // block)
    allowed = {k * block // per_block for k in range(per_block)}  # committed count inside the current block
    seen_blocks = set()
    for row, state in zip(ids.tolist(), states.tolist(), strict=True):
        assert state[: seq - window] == row[: seq - window]  # prefix always visible
        tail, text = state[seq - window:], row[seq - window:]
        masked = [t == MASK for t in tail]
        assert all(t == x for t, x, m in zip(tail, text, masked, strict=True) if not m)  # visible = the text
        current = next(i // block for i, m in enumerate(masked) if m)  # first block with a mask
        seen_blocks.add(current)
        for b in range(window // block):
            part = masked[b * block:(b + 1) * block]
            if b < current:
                assert not any(part)
            elif b > current:
                assert all(part)
            else:
                assert block - sum(part) in allowed
    assert seen_blocks == set(range(window // block))  # every block is drawn as the current one
    assert torch.equal(weights, torch.ones_like(weights))  # uniform without a prior


def test_prior_marks_the_positions_about_to_be_committed():
    ids = _rows(seq=12, n=50)
    prior = torch.linspace(0.5, 1.5, 12)
    states, weights = decoding_states(ids, 8, 4, 8, MASK, torch.Generator().manual_seed(1), prior, floor=0.1)
    for state, w in zip(states.tolist(), weights, strict=True):
        tail = state[4:]
        current = next(i // 4 for i, t in enumerate(tail) if t == MASK)
        mark = torch.full((12,), 0.1)
        for i, t in enumerate(tail):
            if t == MASK and i // 4 == current:
                mark[4 + i] = 1.0
        want = prior * mark
        assert torch.allclose(w, want / want.mean(), atol=1e-6)
    assert torch.allclose(weights.mean(-1), torch.ones(50))


def test_same_generator_same_states_and_bad_settings():
    ids = _rows()
    a = decoding_states(ids, 8, 4, 8, MASK, torch.Generator().manual_seed(3))
    b = decoding_states(ids, 8, 4, 8, MASK, torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0])
    with pytest.raises(ValueError, match="window=8, block_length=3"):
        decoding_states(ids, 8, 3, 8, MASK, torch.Generator())
    with pytest.raises(ValueError, match="prior must have shape"):
        decoding_states(ids, 8, 4, 8, MASK, torch.Generator(), torch.ones(5))
