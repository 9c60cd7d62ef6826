"""Parallel (threshold / factor) decoding in the LLaDA and Dream samplers (issue 34, item 1).

References are brute-force loops written from Fast-dLLM's description (one row, one position at a time),
run on tiny native LLaDA, LLaDA-MoE and Dream models whose heads are sharpened so that several positions
pass the rules.
"""

from __future__ import annotations

import pytest
import torch

from optimum_fair.scoring.policies import rule_counts
from optimum_fair.scoring.sampler import dream_decode, llada_decode
from tests.conftest import tiny_dream, tiny_llada, tiny_lladamoe

VOCAB, MASK = 40, 39
PROMPT = torch.randint(3, MASK, (2, 6), generator=torch.Generator().manual_seed(3))


def sharpened(family: str, scale: float = 30.0):
    """A tiny model of ``family`` with its output head scaled: confident enough for several commits a step."""
    model = {"llada": lambda: tiny_llada(VOCAB, MASK), "lladamoe": lambda: tiny_lladamoe(VOCAB, MASK),
             "dream": lambda: tiny_dream(VOCAB, MASK)}[family]()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(scale)
    return model


def fn_of(model):
    return lambda x, attention_mask=None: model(x, attention_mask=attention_mask).logits


SHIFT = {"llada": 0, "lladamoe": 0, "dream": 1}


def reference_parallel(model, prompt, gen_length, block_length, shift, threshold=None, factor=None):
    """Fast-dLLM's loop, per row: each step commits the most confident masked position of the block, then
    every other one with p >= threshold (or, with a factor, the k-th most confident while
    (k + 1)(1 - p_k) <= factor). Returns (sequence, commit step per generated position)."""
    outs, steps_out = [], []
    for row in prompt:
        x = torch.cat([row, torch.full((gen_length,), MASK)])
        p_len = row.shape[0]
        commit = [-1] * gen_length
        for block in range(gen_length // block_length):
            for j in range(block_length):
                todo = [i for i in range(block * block_length, (block + 1) * block_length) if x[p_len + i] == MASK]
                if not todo:
                    break
                with torch.no_grad():
                    logits = model(x[None]).logits[0].double()
                logits[:, MASK] = float("-inf")
                probs = logits.softmax(-1)
                cand = []
                for i in todo:
                    p = probs[p_len + i - shift]
                    cand.append((float(p.max()), i, int(p.argmax())))
                cand.sort(key=lambda c: (-c[0], c[1]))
                take = [cand[0]]
                for k, c in enumerate(cand[1:], start=2):
                    ok = c[0] >= threshold if threshold is not None else (k + 1) * (1 - c[0]) <= factor
                    if not ok:
                        if factor is not None:
                            break
                        continue
                    take.append(c)
                for _, i, tok in take:
                    x[p_len + i] = tok
                    commit[i] = block * block_length + j
        outs.append(x)
        steps_out.append(commit)
    return torch.stack(outs), torch.tensor(steps_out)


@pytest.mark.parametrize("family", ["llada", "lladamoe", "dream"])
@pytest.mark.parametrize("rule", [dict(threshold=0.6), dict(factor=1.0)])
def test_parallel_rules_match_a_brute_force_loop(family, rule):
    model = sharpened(family)
    trace = llada_decode(fn_of(model), PROMPT, 16, 8, 16, MASK, logit_shift=SHIFT[family], **rule)
    seqs, steps = reference_parallel(model, PROMPT, 16, 8, SHIFT[family], **rule)
    assert torch.equal(trace.sequences, seqs)
    assert torch.equal(trace.commit_step, steps)
    per_step = trace.commits_per_step()  # (steps, batch)
    assert (per_step > 1).any()  # several commits at one step, all recorded
    assert int(per_step.sum()) == 2 * 16 and not trace.commit_margin.isnan().any()
    assert trace.policy == "llada/low_confidence+" + ("threshold0.6" if "threshold" in rule else "factor1")


@pytest.mark.parametrize("family", ["llada", "lladamoe"])
@pytest.mark.parametrize("steps", [16, 8])
def test_an_unreachable_rule_reproduces_the_fixed_schedule(family, steps):
    fn = fn_of(sharpened(family, scale=1.0))  # not sharpened: no proposal reaches p = 1
    base = llada_decode(fn, PROMPT, 16, 8, steps, MASK)
    for rule in (dict(threshold=1.0), dict(factor=1e-12)):
        par = llada_decode(fn, PROMPT, 16, 8, steps, MASK, **rule)
        assert torch.equal(par.sequences, base.sequences)
        assert torch.equal(par.commit_step, base.commit_step)
        assert torch.equal(par.commit_margin, base.commit_margin)


def test_a_filled_block_leaves_empty_slots_and_runs_no_forward():
    model = sharpened("llada", scale=60.0)
    calls = []

    def fn(x, attention_mask=None):
        calls.append(1)
        return model(x).logits

    trace = llada_decode(fn, PROMPT, 16, 8, 16, MASK, threshold=0.5, record_states=True)
    used = (trace.commits_per_step() > 0).any(-1)  # (steps,)
    assert len(calls) == int(used.sum()) < 16
    for step in range(trace.steps):  # recorded states are the states the commits imply
        rebuilt = trace.sequences.clone()
        rebuilt[:, 6:][trace.commit_step >= step] = MASK
        assert torch.equal(trace.states[step], rebuilt)


def reference_dream_threshold(model, prompt, gen_length, steps, threshold):
    """Dream maskgit_plus at temperature 0 with the threshold rule, per row: at least max(1, floor(m(1 - s/t)))
    of the m masked positions (all at the last step), plus every one with p >= threshold."""
    times = torch.linspace(1.0, 1e-3, steps + 1)
    outs = []
    for row in prompt:
        x = torch.cat([row, torch.full((gen_length,), MASK)])
        p_len = row.shape[0]
        for s in range(steps):
            todo = [i for i in range(gen_length) if x[p_len + i] == MASK]
            if not todo:
                break
            count = len(todo) if s == steps - 1 else int(len(todo) * float(1.0 - times[s + 1] / times[s]))
            with torch.no_grad():
                logits = model(x[None]).logits[0].float()
            logits[:, MASK] = float("-inf")
            probs = logits.softmax(-1)
            cand = sorted(((float(probs[p_len + i - 1].max()), i, int(probs[p_len + i - 1].argmax())) for i in todo),
                          key=lambda c: (-c[0], c[1]))
            for rank, (p, i, tok) in enumerate(cand):
                if rank < max(1, count) or p >= threshold:
                    x[p_len + i] = tok
        outs.append(x)
    return torch.stack(outs)


def test_dream_threshold_matches_a_brute_force_loop():
    model = sharpened("dream")
    trace = dream_decode(fn_of(model), PROMPT, 12, 12, MASK, alg="maskgit_plus", threshold=0.6)
    assert torch.equal(trace.sequences, reference_dream_threshold(model, PROMPT, 12, 12, 0.6))
    assert (trace.commits_per_step() > 1).any() and trace.policy == "dream/maskgit_plus+threshold0.6"


def test_factor_rule_by_hand():
    conf = torch.tensor([[0.95, 0.7, 0.6, float("-inf")], [0.3, 0.2, float("-inf"), float("-inf")]],
                        dtype=torch.float64)
    # k=1 always; k=2: 3 * 0.3 = 0.9 <= 1; k=3: 4 * 0.4 = 1.6 > 1 -> 2. Row 2: k=2: 3 * 0.8 > 1 -> 1
    assert rule_counts(conf, factor=1.0).tolist() == [2, 1]
    assert rule_counts(conf, threshold=0.6).tolist() == [3, 0]
    assert rule_counts(conf, threshold=0.6, strict=True).tolist() == [2, 0]


def never_call(*args, **kwargs):
    raise AssertionError("logits_fn must not be called")


BAD = [
    ("threshold must be in \\(0, 1\\]", dict(threshold=0.0)),
    ("threshold must be in \\(0, 1\\]", dict(threshold=1.5)),
    ("threshold must be in \\(0, 1\\]", dict(threshold=-0.2)),
    ("threshold must be in \\(0, 1\\]", dict(threshold=True)),
    ("threshold must be in \\(0, 1\\]", dict(threshold=float("nan"))),
    ("factor must be a number > 0", dict(factor=0.0)),
    ("threshold .* and factor .* give one", dict(threshold=0.9, factor=1.0)),
    ("remasking", dict(threshold=0.9, remasking="random")),
    ("cache", dict(cache=object())),
]


@pytest.mark.parametrize("message,override", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_rules_are_refused_naming_the_field_before_any_forward(message, override):
    with pytest.raises(ValueError, match=message):
        llada_decode(never_call, PROMPT, 8, 4, 8, MASK, **override)


@pytest.mark.parametrize("message,override", [
    ("threshold must be in", dict(alg="maskgit_plus", threshold=2.0)),
    ("alg: threshold", dict(alg="entropy", threshold=0.9)),
    ("alg: threshold", dict(alg="maskgit_plus", alg_temp=0.5, factor=1.0)),
])
def test_dream_refuses_rules_it_cannot_run(message, override):
    with pytest.raises(ValueError, match=message):
        dream_decode(never_call, PROMPT, 8, 8, MASK, **override)
