"""Stability metrics and `evaluate()` under a serving decode policy (issue 34, item 3)."""

from __future__ import annotations

import copy

import pytest
import torch

from optimum_fair.eval.evaluate import TIMING_KEYS, build_teacher_traces, evaluate, logits_fn_of
from optimum_fair.eval.metrics import frontier_flip_rate
from optimum_fair.modeling.kv_cache import ApproximateCache
from optimum_fair.scoring.decoding import DecodePolicy
from optimum_fair.scoring.sampler import llada_decode
from tests.conftest import char_tokenizer, tiny_llada, tiny_llada2
from tests.eval.test_evaluate import TEXTS

SMALL = dict(texts=TEXTS, num_prompts=4, prompt_len=16, gen_length=16, block_length=8, nll_samples=4, seq_len=32,
             post_commit_prompts=0)


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def teacher(tok):
    model = tiny_llada(len(tok), tok.mask_token_id)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30.0)  # confident: several commits per step at 0.5
    return model


def _perturbed(model, scale=0.05):
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(scale * p.abs().mean() * torch.randn(p.shape, generator=gen))
    return out


def test_policy_names_and_checks():
    assert DecodePolicy().name == "schedule"
    assert DecodePolicy("threshold", threshold=0.9, cache="dual").name == "threshold0.9+dual"
    assert DecodePolicy("factor", factor=2.0, cache="prefix").rule_kwargs() == {"factor": 2.0}
    for kwargs, field in ((dict(threshold=0.0), "threshold"), (dict(threshold=1.01), "threshold"),
                          (dict(factor=-1.0), "factor"), (dict(rule="greedy"), "decode"),
                          (dict(cache="full"), "cache")):
        with pytest.raises(ValueError, match=field):
            DecodePolicy(**kwargs)


def reference_flips(trace, model):
    """Per committed position: the student's argmax at the teacher's state before its commit step, by a loop."""
    flips = torch.zeros_like(trace.commit_step, dtype=torch.bool)
    for b in range(trace.batch_size):
        for i in range(trace.gen_len):
            state = trace.state_at(int(trace.commit_step[b, i]))[b : b + 1]
            with torch.no_grad():
                logits = model(state).logits[0, trace.prompt_len + i].clone()
            logits[trace.mask_id] = float("-inf")
            flips[b, i] = int(logits.argmax()) != int(trace.generated[b, i])
    return flips


def test_each_commit_of_a_multi_commit_step_is_one_decision(teacher, tok):
    prompts = torch.randint(4, 60, (3, 10), generator=torch.Generator().manual_seed(2))
    trace = llada_decode(logits_fn_of(teacher), prompts, 16, 8, 16, tok.mask_token_id, threshold=0.5)
    assert (trace.commits_per_step() > 1).any()
    student = _perturbed(teacher)
    res = frontier_flip_rate(trace, logits_fn_of(student), rule=(0.5, None))
    assert torch.equal(res.flipped, reference_flips(trace, student))
    assert res.num_decisions == 3 * 16 and 0 < res.num_flips < 3 * 16
    own = frontier_flip_rate(trace, logits_fn_of(teacher), rule=(0.5, None))
    assert own.num_flips == 0 and own.set_disagreement == 0.0  # the teacher's own rule picks its own set


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_a_cached_replay_of_the_teachers_decode_has_no_flips(teacher, tok, mode):
    prompts = torch.randint(4, 60, (3, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        trace = llada_decode(logits_fn_of(teacher), prompts, 16, 8, 16, tok.mask_token_id, threshold=0.5,
                             cache=ApproximateCache(teacher, mode))
        replay = frontier_flip_rate(trace, None, rule=(0.5, None), cache=ApproximateCache(teacher, mode))
        full = frontier_flip_rate(trace, logits_fn_of(teacher), rule=(0.5, None))
    assert replay.num_flips == 0 and replay.set_disagreement == 0.0
    assert full.num_decisions == replay.num_decisions  # the uncached reading is another student


@pytest.mark.parametrize("policy", [dict(decode="threshold", threshold=0.5), dict(decode="factor", factor=1.0),
                                    dict(decode="threshold", threshold=0.5, cache="prefix"),
                                    dict(decode="threshold", threshold=0.5, cache="dual")])
def test_evaluate_under_a_policy(teacher, tok, policy):
    metrics, traces = evaluate(teacher, tok, teacher, return_traces=True, **SMALL, **policy)
    assert metrics["flip_rate"] == 0.0 and metrics["agreement"] == 1.0
    assert metrics["steps_per_token"] == metrics["teacher_steps_per_token"] < 1.0  # several commits per step
    assert metrics["tokens_per_second"] > 0 and metrics["held/decode_seconds"] > 0
    name = DecodePolicy(policy["decode"], threshold=policy.get("threshold", 0.9), factor=policy.get("factor", 1.0),
                        cache=policy.get("cache", "none")).name
    assert traces["held"].policy == "llada/low_confidence+" + name
    student = evaluate(_perturbed(teacher), tok, teacher_traces=traces, **SMALL, **policy)
    assert student["flip_rate"] > 0 and student["held/decisions"] == 4 * 16
    with pytest.raises(ValueError, match="was decoded with policy"):
        evaluate(teacher, tok, teacher_traces=traces, **SMALL)  # traces of another policy


def test_default_policy_is_todays_one_per_step(teacher, tok):
    metrics, traces = evaluate(teacher, tok, teacher, return_traces=True, **SMALL)
    assert metrics["steps_per_token"] == 1.0 and traces["held"].policy == "llada/low_confidence"
    built = build_teacher_traces(teacher, tok, **{k: SMALL[k] for k in
                                                  ("texts", "num_prompts", "prompt_len", "gen_length", "block_length")},
                                 decode="threshold", threshold=0.5)
    again = evaluate(teacher, tok, teacher_traces=built, decode="threshold", threshold=0.5, **SMALL)
    assert again["flip_rate"] == 0.0 and {f"held/{k}" for k in TIMING_KEYS} <= set(again)


def test_bad_policies_are_refused_before_any_work(tok):
    llada2 = tiny_llada2(len(tok), tok.mask_token_id)
    with pytest.raises(ValueError, match="cache='dual': LLaDA2MoeModelLM has no approximate KV cache"):
        evaluate(llada2, tok, **SMALL, cache="dual")
    model = tiny_llada(len(tok), tok.mask_token_id)
    for kwargs, field in ((dict(decode="threshold", threshold=1.5), "threshold"), (dict(decode="top"), "decode"),
                          (dict(cache="all"), "cache"), (dict(decode="factor", factor=0.0), "factor")):
        with pytest.raises(ValueError, match=field):
            evaluate(model, tok, texts="no-such-text", **kwargs)  # refused before the text is even looked up


def test_the_eval_command_takes_the_policy():
    from optimum_fair.cli import build_parser

    args = build_parser().parse_args(["eval", "some/model", "--decode", "factor", "--factor", "2", "--cache", "dual"])
    kwargs = {name: getattr(args, dest) for name, dest in args.eval_flag_names.items()}
    assert (kwargs["decode"], kwargs["factor"], kwargs["cache"], kwargs["threshold"]) == ("factor", 2.0, "dual", 0.9)
    q = build_parser().parse_args(["quantize", "--output-dir", "x", "--eval-decode", "threshold", "--eval-cache",
                                   "prefix"])
    assert (q.eval_decode, q.eval_cache) == ("threshold", "prefix")


def test_generate_takes_the_policy(teacher, tok):
    from optimum_fair import generate
    from optimum_fair.cli import build_parser

    text, trace = generate(teacher, tok, ["abcdefgh", "xyz"], gen_length=16, block_length=8, threshold=0.5,
                           cache="dual", return_trace=True)
    assert trace.policy == "llada/low_confidence+threshold0.5+dual" and len(text) == 2
    assert trace.steps_per_token() <= 1.0 and not (trace.generated == tok.mask_token_id).any()
    with pytest.raises(ValueError, match="cache='prefix': algorithm='llada2'"):
        generate(tiny_llada2(len(tok), tok.mask_token_id), tok, "abcdefgh", algorithm="llada2", cache="prefix")
    with pytest.raises(ValueError, match="threshold must be in"):
        generate(teacher, tok, "abc", threshold=0.0)
    args = build_parser().parse_args(["generate", "m", "hi", "--threshold", "0.5", "--cache", "dual"])
    assert (args.threshold, args.factor, args.cache) == (0.5, None, "dual")


def test_a_served_policy_is_named_with_its_numbers(teacher, tok):
    from optimum_fair.eval.evaluate import HEADLINE, table

    plain = evaluate(teacher, tok, teacher, **SMALL)
    served = evaluate(teacher, tok, teacher, decode="factor", factor=1.0, cache="prefix", **SMALL)
    assert "decode_policy" not in plain and served["decode_policy"] == "factor1+prefix"
    assert "factor1+prefix" in table({"q": served}, columns=[k for k in HEADLINE if k in served], transpose=True)


@pytest.mark.parametrize("policy", [dict(decode="threshold", threshold=0.5), dict(decode="threshold", threshold=0.5,
                                                                                  cache="prefix"),
                                    dict(decode="factor", factor=1.0, cache="dual"), dict(cache="prefix")])
def test_the_teacher_trajectory_bar_reaches_its_total_under_every_policy(teacher, tok, policy, monkeypatch):
    """The bar counts each step's forward, cached ones too, and the slots a filled block leaves empty, so it ends
    at its total (it stopped short: no tick for a cached forward, none for an empty slot)."""
    import optimum_fair.eval.evaluate as ev

    bars = []

    class Recorded(ev.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "disable": False})
            self.ticks = []
            bars.append(self)

        def update(self, n=1):
            self.ticks.append(n)
            return super().update(n)

    monkeypatch.setattr(ev, "tqdm", Recorded)
    calls = []
    hook = teacher.register_forward_hook(lambda *args: calls.append(1))  # every forward, full or cached
    texts = {"held": TEXTS["held"], "other": TEXTS["held"][::-1]}
    kwargs = {k: SMALL[k] for k in ("prompt_len", "gen_length", "block_length")}
    try:
        traces = build_teacher_traces(teacher, tok, texts=texts, num_prompts=1, **kwargs, **policy)
    finally:
        hook.remove()
    (bar,) = [b for b in bars if b.desc.startswith("teacher trajectories")]
    assert bar.total == 2 * SMALL["gen_length"] and bar.n == bar.total
    steps = SMALL["gen_length"]
    forwards = [len(t.commit_step.unique()) for t in traces.values()]  # one forward per step that commits
    assert len(calls) == sum(forwards)
    # per text: a tick per forward as it returns, then one update for the slots a filled block left empty
    assert bar.ticks == [n for f in forwards for n in [1] * f + [steps - f]]
    if policy.get("decode"):
        assert sum(forwards) < bar.total  # a confident teacher fills its blocks early under a parallel rule
