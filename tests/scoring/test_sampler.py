"""LLaDA / Dream samplers: schedules, determinism, commit bookkeeping and argument checks.

Expected values come from hand-written schedules and logits whose argmax and confidence are set by
construction, never from the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch

from optimum_fair.scoring.policies import llada_transfer_counts, select_top
from optimum_fair.scoring.sampler import dream_decode, llada_decode
from optimum_fair.scoring.trace import DecodeTrace

VOCAB, MASK = 16, 15


def random_lm(seed: int = 0):
    """A content-dependent toy LM: each token mixes its neighbours' embeddings."""
    gen = torch.Generator().manual_seed(seed)
    emb = torch.randn(VOCAB, 8, generator=gen)
    head = torch.randn(8, VOCAB, generator=gen) * 2

    def logits_fn(x, attention_mask=None):
        h = emb[x]  # (batch, seq, 8)
        h = h + h.roll(1, dims=1) + 0.5 * h.mean(1, keepdim=True)
        return h @ head

    return logits_fn


def fixed_lm(table: torch.Tensor):
    """Content-independent LM: logits at absolute position j are table[j] (seq, vocab)."""

    def logits_fn(x, attention_mask=None):
        return table[: x.shape[1]].expand(x.shape[0], -1, -1).clone()

    return logits_fn


def never_call(*args, **kwargs):
    raise AssertionError("logits_fn must not be called")


PROMPT = torch.tensor([[1, 2, 3], [4, 5, 6]])


def test_transfer_counts_match_hand_schedule():
    counts = llada_transfer_counts(torch.tensor([8, 5, 2, 0]), 3)
    assert counts.tolist() == [[3, 3, 2], [2, 2, 1], [1, 1, 0], [0, 0, 0]]


def test_select_top_breaks_ties_low_index_and_skips_ineligible():
    scores = torch.tensor([[0.5, 0.9, 0.5, float("-inf"), 0.9]])
    assert select_top(scores, torch.tensor([3])).tolist() == [[True, True, False, False, True]]
    assert select_top(scores, torch.tensor([5])).tolist() == [[True, True, True, False, True]]


@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
def test_llada_commits_scheduled_count_inside_current_block(remasking):
    gen = torch.Generator().manual_seed(3)
    trace = llada_decode(random_lm(), PROMPT, 16, 8, 6, MASK, remasking=remasking, generator=gen)
    # blocks of 8, 3 steps each: 3, 3, 2 per block
    assert trace.commits_per_step().T.tolist() == [[3, 3, 2, 3, 3, 2]] * 2
    block_of_commit = trace.commit_step // 3  # (batch, gen)
    assert block_of_commit.tolist() == [[0] * 8 + [1] * 8] * 2


def test_low_confidence_commits_in_confidence_order():
    # gen position i favours token i + 4 with logit c_i; p(top-1) increases with c_i
    c = [1.0, 4.0, 2.0, 3.0]
    table = torch.zeros(7, VOCAB)
    for i, ci in enumerate(c):
        table[3 + i, i + 4] = ci
    trace = llada_decode(fixed_lm(table), PROMPT, 4, 4, 4, MASK)
    assert trace.commit_step.tolist() == [[3, 0, 2, 1]] * 2
    assert trace.generated.tolist() == [[4, 5, 6, 7]] * 2
    # margin at commit: p(top1) - p(top2) over the 15 non-mask tokens, by hand
    p1 = [math.exp(ci) / (math.exp(ci) + 14) for ci in c]
    p2 = [1 / (math.exp(ci) + 14) for ci in c]
    margins = torch.tensor([a - b for a, b in zip(p1, p2, strict=True)])
    assert torch.allclose(trace.commit_margin[0], margins, atol=1e-6)


def test_deterministic_at_temperature_zero_and_random_reproducible():
    a = llada_decode(random_lm(), PROMPT, 16, 8, 8, MASK)
    b = llada_decode(random_lm(), PROMPT, 16, 8, 8, MASK)
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.commit_step, b.commit_step)
    runs = [
        llada_decode(random_lm(), PROMPT, 16, 8, 8, MASK, remasking="random", temperature=1.0,
                     generator=torch.Generator().manual_seed(s))
        for s in (7, 7, 8)
    ]
    assert torch.equal(runs[0].commit_step, runs[1].commit_step)
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    assert not torch.equal(runs[0].commit_step, runs[2].commit_step)


@pytest.mark.parametrize("decode", ["llada", "dream_origin", "dream_entropy"])
def test_commits_are_final_and_states_match(decode):
    gen = torch.Generator().manual_seed(1)
    if decode == "llada":
        trace = llada_decode(random_lm(), PROMPT, 8, 4, 4, MASK, temperature=0.7, generator=gen,
                             record_states=True)
    else:
        alg = decode.split("_")[1]
        trace = dream_decode(random_lm(), PROMPT, 8, 5, MASK, alg=alg, temperature=0.7, generator=gen,
                             record_states=True)
    final = trace.generated
    for step in range(trace.steps):
        state_gen = trace.states[step][:, 3:]
        masked = state_gen == MASK
        assert torch.equal(masked, trace.commit_step >= step)  # exactly the not-yet-committed ones
        assert torch.equal(state_gen[~masked], final[~masked])  # committed tokens never change
        assert torch.equal(trace.states[step][:, :3], PROMPT)
    rebuilt = DecodeTrace(**{**trace.to_dict(), "states": None})
    for step in range(trace.steps):
        assert torch.equal(rebuilt.state_at(step), trace.states[step])
    assert not bool((trace.sequences == MASK).any())


def test_mask_token_is_never_committed():
    table = torch.zeros(9, VOCAB)
    table[:, MASK] = 10.0  # the model's favourite is the mask token
    table[:, 9] = 1.0
    for trace in (llada_decode(fixed_lm(table), PROMPT, 6, 3, 6, MASK),
                  dream_decode(fixed_lm(table), PROMPT, 6, 3, MASK, alg="maskgit_plus")):
        assert trace.generated.tolist() == [[9] * 6] * 2


def next_position_lm(target):
    """logits[:, j] favour target[j + 1]: right only when read with logit_shift = 1."""
    table = torch.zeros(len(target), VOCAB)
    for j in range(len(target) - 1):
        table[j, target[j + 1]] = 5.0
    table[-1, 0] = 5.0
    return fixed_lm(table)


def test_logit_shift_reads_previous_position():
    target = [1, 2, 3, 7, 9, 11, 4, 8]  # prompt 3 + gen 5
    fn = next_position_lm(target)
    shifted = llada_decode(fn, PROMPT, 5, 5, 5, MASK, logit_shift=1)
    assert shifted.generated.tolist() == [target[3:]] * 2
    dream = dream_decode(fn, PROMPT, 5, 5, MASK, alg="entropy")  # Dream's default shift is 1
    assert dream.generated.tolist() == [target[3:]] * 2
    unshifted = llada_decode(fn, PROMPT, 5, 5, 5, MASK, logit_shift=0)
    assert unshifted.generated.tolist() != [target[3:]] * 2


def test_dream_confidence_schedule_matches_hand_computed_floor():
    # times linspace(1, 1e-3, 5) = 1, .75025, .5005, .25075, .001
    # 8 masked: floor(8*.24975)=1 -> 7: floor(7*.33289)=2 -> 5: floor(5*.49900)=2 -> 3 left at the last step
    for alg in ("maskgit_plus", "topk_margin", "entropy"):
        trace = dream_decode(random_lm(), PROMPT, 8, 4, MASK, alg=alg)
        assert trace.commits_per_step().T.tolist() == [[1, 2, 2, 3]] * 2
    sampled = dream_decode(random_lm(), PROMPT, 8, 4, MASK, alg="entropy", alg_temp=0.5,
                           generator=torch.Generator().manual_seed(0))
    assert sampled.commits_per_step().T.tolist() == [[1, 2, 2, 3]] * 2


def test_dream_origin_reproducible_and_complete():
    runs = [
        dream_decode(random_lm(), PROMPT, 12, 4, MASK, temperature=1.0,
                     generator=torch.Generator().manual_seed(s))
        for s in (5, 5, 6)
    ]
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    assert torch.equal(runs[0].commit_step, runs[1].commit_step)
    assert not torch.equal(runs[0].commit_step, runs[2].commit_step)
    assert int(runs[0].commits_per_step().sum()) == 24


def test_gumbel_temperature_samples_softmax():
    # one step over 600 positions, two live tokens with p = 0.8 / 0.2 at temperature 1
    table = torch.full((601, VOCAB), -1e4)
    table[:, 4], table[:, 5] = math.log(0.8), math.log(0.2)
    trace = llada_decode(fixed_lm(table), PROMPT[:1, :1], 600, 600, 1, MASK, temperature=1.0,
                         generator=torch.Generator().manual_seed(0))
    share = (trace.generated == 4).double().mean().item()
    assert abs(share - 0.8) < 0.05  # 3 standard errors is 0.049


def test_classifier_free_guidance_uses_masked_prompt():
    # conditional pass favours token 5 by a little, unconditional (prompt masked) favours token 5 a lot:
    # guided = u + 2 (c - u) = 2c - u  ->  token 6
    cond, uncond = torch.zeros(VOCAB), torch.zeros(VOCAB)
    cond[5], cond[6], uncond[5] = 2.0, 1.9, 3.0
    seen = []

    def logits_fn(x, attention_mask=None):
        seen.append(x.clone())
        prompt_masked = (x[:, :3] == MASK).all(-1)  # (batch,)
        rows = torch.where(prompt_masked.view(-1, 1), uncond, cond)  # (batch, vocab)
        return rows.unsqueeze(1).expand(-1, x.shape[1], -1).clone()

    plain = llada_decode(logits_fn, PROMPT, 2, 2, 1, MASK)
    guided = llada_decode(logits_fn, PROMPT, 2, 2, 1, MASK, cfg_scale=1.0)
    assert plain.generated.tolist() == [[5, 5]] * 2
    assert guided.generated.tolist() == [[6, 6]] * 2
    assert seen[-1].shape == (4, 5) and bool((seen[-1][2:, :3] == MASK).all())


def test_attention_mask_extended_and_forwarded():
    seen = []
    base = random_lm()

    def logits_fn(x, attention_mask=None):
        seen.append(attention_mask)
        return base(x)

    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    trace = llada_decode(logits_fn, PROMPT, 4, 4, 2, MASK, attention_mask=mask, cfg_scale=0.5)
    assert seen[0].tolist() == [[0, 1, 1, 1, 1, 1, 1], [1] * 7] * 2
    assert trace.attention_mask.tolist() == [[0, 1, 1, 1, 1, 1, 1], [1] * 7]
    pad_mask_prompt = torch.tensor([[MASK, 2, 3], [4, 5, 6]])  # a padded slot may hold the mask id
    dream_decode(logits_fn, pad_mask_prompt, 4, 2, MASK, attention_mask=mask)


def test_record_topk_holds_unshifted_top1_and_probability():
    table = torch.zeros(6, VOCAB)
    table[3:, 7] = torch.tensor([1.0, 2.0, 3.0])
    trace = llada_decode(fixed_lm(table), PROMPT, 3, 3, 3, MASK, record_topk=True)
    assert trace.top1_token.shape == (3, 2, 3)
    assert bool((trace.top1_token == 7).all())
    expected = torch.tensor([math.exp(c) / (math.exp(c) + 14) for c in (1.0, 2.0, 3.0)])
    assert torch.allclose(trace.top1_prob[0, 0], expected, atol=1e-6)


def test_trace_save_load_roundtrip(tmp_path):
    trace = llada_decode(random_lm(), PROMPT, 8, 4, 4, MASK, record_topk=True, record_states=True)
    trace.save(tmp_path / "trace.pt")
    back = DecodeTrace.load(tmp_path / "trace.pt")
    for name, value in trace.to_dict().items():
        other = getattr(back, name)
        assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, name


BAD_LLADA = [
    ("remasking", dict(remasking="greedy")),
    ("block_length", dict(gen_length=10, block_length=4)),
    ("steps", dict(gen_length=8, block_length=4, steps=3)),
    ("steps", dict(gen_length=8, block_length=4, steps=10)),
    ("mask_id", dict(mask_id=None)),
    ("prompt_ids", dict(prompt_ids=torch.tensor([[1, MASK]]))),
    ("prompt_ids", dict(prompt_ids=torch.tensor([1, 2]))),
    ("logit_shift", dict(logit_shift=2)),
    ("temperature", dict(temperature=-1.0)),
    ("cfg_scale", dict(cfg_scale=-0.5)),
    ("attention_mask", dict(attention_mask=torch.ones(1, 5))),
    ("gen_length", dict(gen_length=0)),
]


@pytest.mark.parametrize("name,override", BAD_LLADA, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD_LLADA)])
def test_llada_rejects_bad_arguments_before_forward(name, override):
    kwargs = dict(prompt_ids=torch.tensor([[1, 2]]), gen_length=8, block_length=4, steps=4, mask_id=MASK)
    kwargs.update(override)
    with pytest.raises(ValueError, match=name):
        llada_decode(never_call, **kwargs)


BAD_DREAM = [
    ("alg", dict(alg="beam")),
    ("mask_id", dict(mask_id=None)),
    ("prompt_ids", dict(prompt_ids=torch.tensor([[MASK, 2]]))),
    ("steps", dict(steps=0)),
    ("top_p", dict(top_p=0.0)),
    ("top_k", dict(top_k=0)),
    ("eps", dict(eps=1.0)),
    ("alg_temp", dict(alg_temp=-1.0)),
    ("logit_shift", dict(logit_shift=1, prompt_ids=torch.zeros(1, 0, dtype=torch.long))),
]


@pytest.mark.parametrize("name,override", BAD_DREAM, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD_DREAM)])
def test_dream_rejects_bad_arguments_before_forward(name, override):
    kwargs = dict(prompt_ids=torch.tensor([[1, 2]]), gen_length=8, steps=4, mask_id=MASK)
    kwargs.update(override)
    with pytest.raises(ValueError, match=name):
        dream_decode(never_call, **kwargs)


def test_wrong_logits_shape_is_reported():
    with pytest.raises(ValueError, match="logits_fn"):
        llada_decode(lambda x: torch.zeros(x.shape[0], VOCAB), PROMPT, 4, 4, 4, MASK)
