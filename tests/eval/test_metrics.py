"""Stability metrics on hand-built traces whose answers are worked out by hand."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from optimum_fair.eval import metrics as M
from optimum_fair.scoring.sampler import dream_decode, llada_decode
from optimum_fair.scoring.trace import DecodeTrace

VOCAB, MASK = 16, 15
NAN = float("nan")


def make_trace(gen, commit, margin=None, block_length=None, shift=0, top1=None):
    """Prompt = [0] (one position), one row per entry of ``gen``."""
    gen = torch.tensor(gen)
    batch, gen_len = gen.shape
    return DecodeTrace(
        sequences=torch.cat([torch.zeros(batch, 1, dtype=torch.long), gen], dim=1),
        commit_step=torch.tensor(commit),
        commit_margin=torch.tensor(margin) if margin is not None else torch.zeros(batch, gen_len),
        prompt_len=1, gen_len=gen_len, steps=gen_len, block_length=block_length or gen_len,
        mask_id=MASK, logit_shift=shift, top1_token=None if top1 is None else torch.tensor(top1),
    )


def shifted(logits, shift):
    """Move per-position predictions (batch, seq, vocab) to where a model with ``shift`` emits them."""
    return torch.cat([logits[:, 1:], logits[:, -1:]], dim=1) if shift else logits


def count_student(conf):
    """Predicts token (number of masked generated positions + 4) everywhere, with logit 2 + conf[i]
    at generated position i, and a large mask-token logit (must be ignored)."""

    def logits_fn(x, attention_mask=None):
        batch, seq = x.shape
        m = (x == MASK).sum(-1)  # (batch,)
        out = torch.zeros(batch, seq, VOCAB)
        out[:, :, MASK] = 50.0
        for b in range(batch):
            out[b, 1:, int(m[b]) + 4] = 2.0 + torch.tensor(conf)
        return out

    return logits_fn


def test_flip_rate_reads_teacher_states():
    # commit order: pos1 @0, pos3 @1, pos0 @2, pos2 @3; masked counts 4, 3, 2, 1 -> student says 8, 7, 6, 5
    trace = make_trace([[6, 8, 7, 2]], [[2, 0, 3, 1]], margin=[[0.5, 0.05, 0.2, 0.0]])
    res = M.frontier_flip_rate(trace, count_student([3.0, 2.0, 1.0, 0.0]))
    # pos1: 8 == 8; pos3: 7 != 2 (flip); pos0: 6 == 6; pos2: 5 != 7 (flip)
    assert res.flipped.tolist() == [[False, False, True, True]]
    assert (res.num_decisions, res.num_flips, res.flip_rate) == (4, 2, 0.5)
    # confident (margin >= 0.1): pos0, pos2 -> one flip
    assert (res.num_confident, res.num_confident_flips, res.flip_rate_confident) == (2, 1, 0.5)
    assert res.first_flip_step.tolist() == [1]
    # student picks the most confident masked position: step0 {0} vs {1}: 2; step1 {0} vs {3}: 2;
    # step2 {0} vs {0}: 0; step3 {2} vs {2}: 0  -> mean 1.0
    assert res.set_disagreement == pytest.approx(1.0)


def test_flip_rate_threshold_and_shift():
    trace = make_trace([[6, 8, 7, 2]], [[2, 0, 3, 1]], margin=[[0.5, 0.05, 0.2, 0.0]], shift=1)
    base = count_student([3.0, 2.0, 1.0, 0.0])
    def student(x, attention_mask=None):
        return shifted(base(x), 1)

    res = M.frontier_flip_rate(trace, student, margin_threshold=0.3)
    assert res.flipped.tolist() == [[False, False, True, True]]
    assert (res.num_confident, res.num_confident_flips) == (1, 0)


def test_set_disagreement_stays_inside_current_block():
    # blocks of 2 with 2 steps each; the student prefers position 3, which is outside block 0
    trace = make_trace([[6, 8, 6, 5]], [[1, 0, 3, 2]], block_length=2)
    res = M.frontier_flip_rate(trace, count_student([0.0, 1.0, 2.0, 3.0]))
    assert res.set_disagreement == pytest.approx(0.0)


def test_teacher_against_itself_has_no_flips():
    gen = torch.Generator().manual_seed(0)
    emb, head = torch.randn(VOCAB, 8, generator=gen), torch.randn(8, VOCAB, generator=gen)

    def lm(x, attention_mask=None):
        h = emb[x]
        return (h + h.roll(1, dims=1) + h.mean(1, keepdim=True)) @ head

    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    teachers = (llada_decode(lm, prompt, 8, 4, 8, MASK),
                dream_decode(lm, prompt, 8, 8, MASK, alg="maskgit_plus"))
    for trace in teachers:
        res = M.frontier_flip_rate(trace, lm)
        assert res.num_flips == 0 and res.set_disagreement == 0.0
        assert res.first_flip_step.tolist() == [-1, -1]


def loo_model(final_row):
    """At position i: final_row[i] if x_i is masked and >= 3 positions are masked, else token 1."""
    final = torch.tensor(final_row)  # (gen,), shared by every row

    def preds(x):
        gen = x[:, 1:]
        m = (gen == MASK).sum(-1, keepdim=True)  # (batch, 1)
        tok = torch.where((gen == MASK) & (m >= 3), final, torch.ones_like(gen))
        out = torch.zeros(x.shape[0], x.shape[1], VOCAB)
        out[:, 1:].scatter_(-1, tok.unsqueeze(-1), 5.0)
        out[:, :, MASK] = 50.0  # ignored by the metric
        return out

    return preds


@pytest.mark.parametrize("shift", [0, 1])
@pytest.mark.parametrize("max_batch", [1, 16])
def test_post_commit_mismatch_leave_one_out(shift, max_batch):
    final = [[5, 6, 7, 8], [5, 6, 7, 8]]
    trace = make_trace(final, [[0, 1, 2, 3], [3, 2, 1, 0]], shift=shift)
    preds = loo_model(final[0])
    def model(x, attention_mask=None):
        return shifted(preds(x), shift)

    res = M.post_commit_mismatch(trace, model, max_batch=max_batch)
    # first committed position: re-masked at t = 1, 2, 3 sees 4, 3, 2 masks -> agree, agree, disagree
    expected = torch.tensor([[1 / 3, 1 / 2, 1.0, NAN], [NAN, 1.0, 1 / 2, 1 / 3]], dtype=torch.float64)
    assert torch.allclose(res.disagree_fraction, expected, equal_nan=True)
    assert res.num_positions == 6
    assert res.mean_disagree == pytest.approx(11 / 18)
    assert res.never_agree == pytest.approx(1 / 3)


def test_post_commit_mismatch_raw_reads_unmasked_output():
    final = [[5, 6, 7, 8]]
    trace = make_trace(final, [[0, 1, 2, 3]])
    preds = loo_model(final[0])
    res = M.post_commit_mismatch(trace, lambda x, attention_mask=None: preds(x), mode="raw")
    assert (res.mean_disagree, res.never_agree, res.num_positions) == (1.0, 1.0, 3)
    with pytest.raises(ValueError, match="mode"):
        M.post_commit_mismatch(trace, preds, mode="median")


def test_post_commit_top1_table_by_hand():
    final = [[5, 6, 7, 8]]
    trace = make_trace(final, [[0, 1, 2, 3]])
    preds = loo_model(final[0])
    table = M.post_commit_top1(trace, lambda x, attention_mask=None: preds(x))
    # step t: masked positions read plainly (m = 4 - t), committed ones leave-one-out (m = 5 - t)
    assert table[:, 0].tolist() == [[5, 6, 7, 8], [5, 6, 7, 8], [5, 6, 1, 1], [1, 1, 1, 1]]


def test_stability_lag_by_hand():
    top1 = [[[5, 1, 7, 2]], [[5, 6, 7, 2]], [[5, 1, 7, 2]], [[5, 6, 7, 2]]]  # (steps=4, batch=1, gen=4)
    trace = make_trace([[5, 6, 7, 9]], [[0, 2, 3, 1]], top1=top1)
    # t_align: pos0 0, pos1 3 (agrees from step 3 on), pos2 0, pos3 never -> 4
    assert M.stability_lag(trace).tolist() == [[0, 1, -3, 3]]
    with pytest.raises(ValueError, match="record_topk"):
        M.stability_lag(make_trace([[5]], [[0]]))


def test_lag_ccdf_by_hand():
    values, ccdf = M.lag_ccdf(torch.tensor([0, 1, -3, 3, 1]))
    assert values.tolist() == [-3, 0, 1, 3]
    assert torch.allclose(ccdf, torch.tensor([1.0, 0.8, 0.6, 0.2], dtype=torch.float64))


def test_stepwise_prob_mse_by_hand():
    # teacher uniform over tokens 0-2; student (1/2, 1/4, 1/4) except at generated position 0;
    # ||p_q - p*||^2 = (1/6)^2 + 2 (1/12)^2 = 1/24
    def lm(student):
        def logits_fn(x, attention_mask=None):
            out = torch.full((x.shape[0], x.shape[1], VOCAB), -1e9)
            out[..., :3] = 0.0
            out[..., MASK] = 10.0  # excluded from both distributions
            if student:
                out[:, 2:, 0] = math.log(2.0)
            return out

        return logits_fn

    trace = make_trace([[5, 6, 7, 8]], [[0, 1, 2, 3]])
    mse = M.stepwise_prob_mse(trace, lm(True), lm(False))
    assert mse.shape == (4, 1)
    assert torch.allclose(mse[:, 0], torch.tensor([1 / 32, 1 / 24, 1 / 24, 1 / 24], dtype=torch.float64))


def test_align_to_first_flip_by_hand():
    per_step = torch.tensor([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0]])
    offsets, mean = M.align_to_first_flip(per_step, torch.tensor([1, -1]))
    assert offsets.tolist() == [-2, -1, 0, 1, 2]
    assert torch.allclose(mean, torch.tensor([NAN, 1.0, 2.0, 3.0, NAN], dtype=torch.float64), equal_nan=True)


def test_metrics_and_scoring_import_without_transformers():
    # the package __init__ registers with transformers, so it is stubbed out here: this checks the
    # import chain of metrics and scoring themselves
    code = (
        "import sys, types\n"
        "sys.modules['transformers'] = None\n"
        f"pkg = types.ModuleType('optimum_fair'); pkg.__path__ = [{str(Path(M.__file__).parent.parent)!r}]\n"
        "sys.modules['optimum_fair'] = pkg\n"
        "import optimum_fair.eval.metrics, optimum_fair.scoring.sampler\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
