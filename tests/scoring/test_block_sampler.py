"""LLaDA2's block-diffusion sampler against a re-implementation of its released generate()."""

import pytest
import torch
import torch.nn.functional as F

from optimum_fair.scoring import llada2_decode
from tests.conftest import tiny_llada2

VOCAB, MASK = 96, 95


@pytest.fixture(scope="module")
def sharp():
    """A tiny LLaDA2 with a sharpened head: some proposals pass a 0.9 threshold, the mask token never wins."""
    model = tiny_llada2(VOCAB, MASK)
    with torch.no_grad():
        model.lm_head.weight.mul_(60.0)
        model.lm_head.weight[MASK] = 0.0
    return model


def released_generate(model, prompt, gen_length, block_length, steps, threshold, mask_id):
    """The released loop (batch 1, temperature 0, no EOS stop): prefix windows under the additive
    block mask (tril over blocks, .log()), threshold or top-count commits per step."""
    p_len = prompt.shape[1]
    n_blocks = (p_len + gen_length + block_length - 1) // block_length
    total = n_blocks * block_length
    blocks = torch.tril(torch.ones(n_blocks, n_blocks))
    mask = blocks.repeat_interleave(block_length, 0).repeat_interleave(block_length, 1)[None, None].log()
    x = torch.full((1, total), mask_id, dtype=torch.long)
    x[:, :p_len] = prompt
    schedule = torch.full((steps,), block_length // steps, dtype=torch.int64)
    schedule[: block_length % steps] += 1
    forwards = 0
    for nb in range(p_len // block_length, n_blocks):
        end = (nb + 1) * block_length
        cur = x[:, :end]
        for step in range(steps):
            active = cur[:, -block_length:] == mask_id
            if active.sum() == 0:
                break
            logits = model(cur, attention_mask=mask[:, :, :end, :end], position_ids=torch.arange(end)[None]).logits
            forwards += 1
            probs = F.softmax(logits[:, -block_length:].double(), dim=-1)
            x0 = probs.argmax(-1)
            assert not (x0 == mask_id).any()  # our sampler never proposes the mask: the test needs this
            x0_p = probs.gather(-1, x0.unsqueeze(-1)).squeeze(-1)
            num = schedule[step].item()
            conf = torch.where(active, x0_p, -torch.inf)
            high = conf[0] > threshold
            transfer = torch.zeros_like(x0, dtype=torch.bool)
            if high.sum().item() >= num:
                transfer[0] = high
            else:
                transfer[0, torch.topk(conf[0], k=min(num, active.sum().item()))[1]] = True
            cur[:, -block_length:][transfer] = x0[transfer]
        x[:, :end] = cur
    return x[:, : p_len + gen_length], forwards


def _fn(model):
    return lambda x, attention_mask=None: model(x, attention_mask=attention_mask).logits


def test_matches_the_released_generate_and_exercises_both_commit_rules(sharp):
    prompt = torch.randint(3, 90, (1, 8), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref, forwards = released_generate(sharp, prompt, 24, 8, 4, 0.8, MASK)
        trace = llada2_decode(_fn(sharp), prompt, 24, 8, 4, MASK, threshold=0.8)
    assert torch.equal(trace.sequences, ref)
    per_step = trace.commits_per_step()[:, 0]  # (steps,): 3 blocks x 4 slots
    assert trace.steps == 12 and int(per_step.sum()) == 24
    assert (per_step > 2).any()  # a step committed more than the schedule's 2: the threshold rule ran
    assert (per_step == 0).any() and forwards < 12  # a block filled up early; its slots commit nothing
    for b in range(3):  # each block's commits fall in its own slots
        steps = trace.commit_step[0, 8 * b:8 * (b + 1)]
        assert ((steps >= 4 * b) & (steps < 4 * (b + 1))).all()


def test_batch_rows_decode_as_they_would_alone(sharp):
    prompts = torch.randint(3, 90, (3, 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        batch = llada2_decode(_fn(sharp), prompts, 16, 8, 4, MASK, threshold=0.9, record_topk=True,
                              record_states=True)
        for i in range(3):
            one = llada2_decode(_fn(sharp), prompts[i:i + 1], 16, 8, 4, MASK, threshold=0.9)
            assert torch.equal(batch.sequences[i], one.sequences[0])
            assert torch.equal(batch.commit_step[i], one.commit_step[0])
    for step in range(batch.steps):  # recorded states are the states the commits imply
        rebuilt = batch.sequences.clone()
        rebuilt[:, 8:][batch.commit_step >= step] = MASK
        assert torch.equal(batch.states[step], rebuilt)
    assert batch.top1_token.shape == (batch.steps, 3, 16)


def test_sampling_is_reproducible_with_a_generator():
    model = tiny_llada2(VOCAB, MASK)  # not sharpened: samples differ between seeds
    prompt = torch.randint(3, 90, (2, 8), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        a, b, c = (llada2_decode(_fn(model), prompt, 8, 8, 2, MASK, temperature=1.0, top_k=5,
                                 generator=torch.Generator().manual_seed(s)) for s in (1, 1, 2))
    assert torch.equal(a.sequences, b.sequences)
    assert not (a.sequences == MASK).any() and not torch.equal(a.sequences, c.sequences)


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(prompt_len=6), "prompt length \\(6\\) and gen_length \\(16\\) must be multiples of block_length \\(8\\)"),
    (dict(gen_length=12), "must be multiples of block_length"),
    (dict(threshold=1.5), "threshold must be in \\[0, 1\\], got 1.5"),
    (dict(steps=0), "steps"),
])
def test_bad_arguments_are_named(sharp, kwargs, message):
    prompt = torch.randint(3, 90, (1, kwargs.pop("prompt_len", 8)))
    args = dict(gen_length=16, block_length=8, steps=4, mask_id=MASK, threshold=0.9) | kwargs
    with pytest.raises(ValueError, match=message):
        llada2_decode(_fn(sharp), prompt, **args)


def test_generate_runs_llada2_with_its_defaults(tmp_path):
    from optimum_fair import generate
    from tests.conftest import char_tokenizer

    tok = char_tokenizer()
    model = tiny_llada2(len(tok), tok.mask_token_id)
    text, trace = generate(model, tok, "abcdefgh", gen_length=16, block_length=8, algorithm="llada2",
                           return_trace=True)
    assert trace.policy == "llada2/threshold0.95" and trace.steps == 2 * 8  # 8 steps per block by default
    assert isinstance(text, str) and not (trace.generated == tok.mask_token_id).any()
    with pytest.raises(ValueError, match="without padding"):
        generate(model, tok, ["abcdefgh", "ab"], gen_length=16, block_length=8, algorithm="llada2")
