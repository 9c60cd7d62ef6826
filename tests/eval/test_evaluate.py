"""evaluate(): masked NLL on fixed positions, teacher-forced flips, agreement, post-commit; table()."""

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from optimum_fair.eval.evaluate import (
    TIMING_KEYS,
    build_teacher_traces,
    evaluate,
    mask_positions,
    masked_nll,
    table,
)
from tests.conftest import char_tokenizer, tiny_llada

SENTENCES = ["The quick brown fox jumps over the lazy dog near the river bank. ",
             "A diffusion model commits tokens over many steps, never revising them. ",
             "Quantization noise flips borderline decisions at the write frontier. "]
TEXTS = {"held": [" ".join(SENTENCES[(i + j) % 3] for j in range(6)) for i in range(12)]}
SMALL = dict(texts=TEXTS, num_prompts=4, prompt_len=16, gen_length=16, block_length=8, nll_samples=6, seq_len=32,
             post_commit_prompts=1)


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def teacher(tok):
    torch.manual_seed(0)
    return tiny_llada(len(tok), tok.mask_token_id)


@pytest.fixture(scope="module")
def teacher_run(teacher, tok):
    return evaluate(teacher, tok, teacher, return_traces=True, **SMALL)


def _perturbed(model, scale=0.05):
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return out


def test_teacher_against_itself_has_no_flips(teacher_run):
    metrics, traces = teacher_run
    assert metrics["held/flip_rate"] == 0.0 and metrics["held/flips"] == 0
    assert metrics["held/decisions"] == 4 * 16
    assert metrics["held/agreement"] == 1.0 and metrics["agreement"] == 1.0
    assert metrics["held/frontier_set_disagreement"] == 0.0
    assert 0.0 <= metrics["held/post_commit_mean_disagree"] <= 1.0
    assert metrics["nll"] == metrics["held/nll"] > 0
    assert set(traces) == {"held"} and traces["held"].batch_size == 4


def test_perturbed_copy_flips_and_reuses_traces(teacher, tok, teacher_run):
    metrics, traces = teacher_run
    student = _perturbed(teacher)
    reused = evaluate(student, tok, teacher_traces=traces, **SMALL)
    assert reused["held/flip_rate"] > 0 and reused["held/flips"] > 0
    assert reused["held/agreement"] < 1.0
    assert reused["held/nll"] != metrics["held/nll"]
    fresh = evaluate(student, tok, teacher, **SMALL)

    def timeless(m):  # wall-clock keys differ between any two runs
        return {k: v for k, v in m.items() if not k.endswith(TIMING_KEYS)}

    assert timeless(fresh) == pytest.approx(timeless(reused), nan_ok=True)  # cached trajectories change nothing


def test_build_teacher_traces_matches_evaluate(teacher, tok, teacher_run):
    built = build_teacher_traces(teacher, tok, **{k: SMALL[k] for k in
                                                  ("texts", "num_prompts", "prompt_len", "gen_length", "block_length")})
    assert torch.equal(built["held"].sequences, teacher_run[1]["held"].sequences)


def test_masked_positions_are_seeded_and_exact():
    a = mask_positions((3, 20), 0.5, 1, seed=4)
    assert torch.equal(a, mask_positions((3, 20), 0.5, 1, seed=4))
    assert not torch.equal(a, mask_positions((3, 20), 0.5, 1, seed=5))
    assert a.sum(-1).tolist() == [10, 10, 10] and not a[:, 0].any()  # position 0 unpredictable when shifted


class _Oracle(nn.Module):
    """Logits that put all mass on the true next token of the sequence i -> (i % 50) + 4, written at
    position i - 1: right for a shifted (Dream) reading, wrong for an unshifted one."""

    def __init__(self, model_type):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(model_type=model_type, mask_token_id=3, vocab_size=60,
                                      max_position_embeddings=64, max_sequence_length=64)

    def forward(self, input_ids, attention_mask=None):
        seq = input_ids.shape[1]
        nxt = (torch.arange(1, seq + 1) % 50) + 4  # (seq,)
        logits = torch.full((*input_ids.shape, 60), -30.0)
        logits[:, torch.arange(seq), nxt] = 30.0
        return SimpleNamespace(logits=logits)


def test_masked_nll_respects_logit_shift():
    seqs = ((torch.arange(32) % 50) + 4).repeat(5, 1)  # (5, 32)
    shifted = masked_nll(_Oracle("Dream"), seqs, 0.5, seed=0)
    unshifted = masked_nll(_Oracle("llada"), seqs, 0.5, seed=0)
    assert shifted["acc"] == 1.0 and shifted["nll"] < 1e-6
    assert unshifted["acc"] == 0.0 and unshifted["nll"] > 10
    assert shifted["masked_tokens"] == 5 * round(0.5 * 31)


def test_bad_arguments_fail_before_any_forward(teacher, tok, teacher_run):
    calls = []
    handle = teacher.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match="mask_ratio"):
            evaluate(teacher, tok, teacher, **{**SMALL, "mask_ratio": 1.5})
        with pytest.raises(ValueError, match="maximum length"):
            evaluate(teacher, tok, teacher, **{**SMALL, "prompt_len": 60})
        with pytest.raises(ValueError, match="block_length"):
            evaluate(teacher, tok, teacher, **{**SMALL, "block_length": 5})
        with pytest.raises(ValueError, match="teacher_traces"):
            evaluate(teacher, tok, teacher_traces=teacher_run[1], **{**SMALL, "gen_length": 8})
        with pytest.raises(ValueError, match="no trajectories"):
            evaluate(teacher, tok, teacher_traces={}, **SMALL)
    finally:
        handle.remove()
    assert calls == []


def test_table_formats_rows_and_transposes():
    rows = {"FP": {"nll": 4.123456, "flip_rate": 0.0, "flips": 0},
            "W4A4": {"nll": 4.3, "flip_rate": 0.125, "flips": 8, "flip_rate_m0.1": math.nan}}
    text = table(rows)
    lines = text.splitlines()
    assert lines[0] == "| model | nll | flip_rate | flips | flip_rate_m0.1 |"
    assert lines[2] == "| FP | 4.123 | 0 | 0 | - |"
    assert lines[3] == "| W4A4 | 4.3 | 0.125 | 8 | - |"
    flipped = table(rows, columns=["nll"], transpose=True).splitlines()
    assert flipped == ["| metric | FP | W4A4 |", "|---|---|---|", "| nll | 4.123 | 4.3 |"]
    with pytest.raises(ValueError):
        table({})


def test_details_give_per_prompt_flips_and_lags(teacher, tok, teacher_run):
    """details=True adds per-prompt counts that sum to the pooled ones, and δ_lag of the own decodes
    computed from the same leave-one-out table as the post-commit mismatch."""
    from optimum_fair.eval.evaluate import greedy_trace, logits_fn_of
    from optimum_fair.eval.metrics import post_commit_top1, stability_lag

    _, traces = teacher_run
    student = _perturbed(teacher)
    m = evaluate(student, tok, teacher_traces=traces, details=True, **SMALL)
    plain = evaluate(student, tok, teacher_traces=traces, **SMALL)
    def timeless(d):  # wall-clock keys differ between any two runs
        return {k: v for k, v in d.items() if not isinstance(v, list) and not k.endswith(TIMING_KEYS)}

    assert timeless(m) == pytest.approx(timeless(plain), nan_ok=True)
    per = m["held/flips_per_prompt"]
    assert len(per) == 4 and sum(per) == m["held/flips"] > 0
    assert sum(m["held/confident_flips_per_prompt"]) == m["held/flips_m0.1"]
    assert sum(m["held/confident_per_prompt"]) == m["held/decisions_m0.1"]
    trace = traces["held"]
    keep = SMALL["post_commit_prompts"]
    own = greedy_trace(student, trace.sequences[:keep, : trace.prompt_len], trace.gen_len, trace.block_length,
                       trace.steps)
    table = post_commit_top1(own, logits_fn_of(student), mode="loo", max_batch=7)
    assert m["held/lags"] == stability_lag(own, table).flatten().tolist()
    # the per-unit lists for paired statistics reproduce the pooled values
    from optimum_fair.eval.metrics import post_commit_mismatch

    windows = m["held/nll_per_window"]
    assert len(windows) == m["held/masked_tokens"] // (SMALL["seq_len"] // 2)
    assert sum(windows) / len(windows) == pytest.approx(m["held/nll"], rel=1e-6)
    assert len(set(windows)) > 1
    sets = m["held/set_disagreement_per_prompt"]
    assert len(sets) == 4 and sum(sets) / 4 == pytest.approx(m["held/frontier_set_disagreement"])
    post = post_commit_mismatch(own, logits_fn_of(student), table=table)
    assert m["held/post_commit_disagree_per_prompt"] == pytest.approx(
        [float(post.disagree_fraction[0].nanmean())])
    assert m["held/post_commit_disagree_per_prompt"][0] == pytest.approx(m["held/post_commit_mean_disagree"])


def test_teacher_trajectories_show_a_bar_over_their_decoding_steps(teacher, tok, teacher_run, capsys):
    """issue 32 N8: `quantize --eval` and `eval --base` were silent ~50 s while the teacher decoded (the bar
    only started afterwards); the trajectories now advance a bar per decoding step, same result."""
    from optimum_fair.eval.evaluate import greedy_trace

    calls = []
    prompts = torch.randint(4, 60, (2, 16), generator=torch.Generator().manual_seed(0))
    quiet = greedy_trace(teacher, prompts, 16, 8, 16)
    counted = greedy_trace(teacher, prompts, 16, 8, 16, progress=lambda: calls.append(1))
    assert len(calls) == 16 and torch.equal(counted.sequences, quiet.sequences)
    capsys.readouterr()
    built = build_teacher_traces(teacher, tok, **{k: SMALL[k] for k in
                                                  ("texts", "num_prompts", "prompt_len", "gen_length", "block_length")})
    err = capsys.readouterr().err
    assert "teacher trajectories" in err and "/16 [" in err  # steps of the one text
    assert torch.equal(built["held"].sequences, teacher_run[1]["held"].sequences)
