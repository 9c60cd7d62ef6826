"""Stage I under the serving policy through the config (issue 34, item 4): stage1_policy / stage1_threshold /
stage1_factor / stage1_cache reach the probe rollouts, are saved with the prior and checked on reuse."""

import json
import logging

import pytest
import torch

from optimum_fair import FairCalibConfig
from optimum_fair.data import load_texts, resolve_tokenizer
from optimum_fair.distributed import batch_seed
from optimum_fair.pipeline.plan import make_plan
from optimum_fair.pipeline.stage1 import build_prior, probe_source
from optimum_fair.scoring.prior import prior_from_rollouts, probe_rollouts
from tests.conftest import tiny_llada2

SMALL = dict(num_probes=8, seq_len=32, window=16, block_length=8, batch_size=4, dataset="lee",
             compute_dtype="float32")


def _direct_prior(model, tok, config):
    """The prior from one direct `probe_rollouts` call (random commits, no cache), as Stage I did before."""
    plan = make_plan(model, config, torch.device("cpu"), stage_one=True)
    setup, s = plan.decode, plan.stage_one
    ids = probe_source(load_texts(config.dataset), resolve_tokenizer(tok, model), s, setup, model)()
    prompts = ids[:, : setup.seq_len - setup.window]  # (P, N - K); one batch of <= probe_batch probes
    fn = lambda x, **kw: model(x).logits.float()  # noqa: E731
    gen = torch.Generator().manual_seed(batch_seed(s.seed, "probes", 0))
    commit, rel = probe_rollouts(fn, prompts, setup.window, setup.block_length, setup.steps, setup.mask_id,
                                 setup.logit_shift, s.reliability, batch_size=prompts.shape[0], generator=gen)
    return prior_from_rollouts(commit, rel, seq_len=setup.seq_len, steps=setup.steps, beta=s.early_boost,
                               schedule=s.boost_schedule, lambda1=s.lambda1(setup.steps), floor=s.floor,
                               logit_shift=setup.logit_shift, frontier_weight=s.frontier_weight)


def _confident(model):
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30.0)  # blocks fill before their step budget at 0.5
    return model


def test_the_defaults_give_the_prior_of_a_direct_random_commit_rollout(llada, tok):
    prior = build_prior(llada, FairCalibConfig(**SMALL), tok)
    assert torch.equal(prior.weights, _direct_prior(llada, tok, FairCalibConfig(**SMALL)).weights)
    settings = prior.settings
    assert (settings["stage1_policy"], settings["stage1_threshold"], settings["stage1_factor"],
            settings["stage1_cache"]) == ("random", None, None, "none")
    # the threshold / factor of a policy not chosen is ignored
    other = build_prior(llada, FairCalibConfig(**SMALL, stage1_threshold=0.3, stage1_factor=3.0), tok)
    assert torch.equal(other.weights, prior.weights) and other.settings == settings


def test_a_prefix_cache_prior_is_within_one_percent_of_the_uncached_one(llada, tok):
    exact = build_prior(llada, FairCalibConfig(**SMALL), tok)
    cached = build_prior(llada, FairCalibConfig(**SMALL, stage1_cache="prefix"), tok)
    assert torch.equal(cached.commit_step, exact.commit_step)  # the random commit order is the same
    assert float((cached.weights - exact.weights).norm() / exact.weights.norm()) < 0.01  # stated tolerance
    assert cached.settings["stage1_cache"] == "prefix"


@pytest.mark.parametrize("cache", ["none", "prefix"])
def test_the_threshold_policy_commits_several_per_step_and_is_saved(tmp_path, llada, tok, cache, caplog):
    model = _confident(llada)
    cfg = dict(SMALL, stage1_policy="threshold", stage1_threshold=0.5, stage1_cache=cache)
    prior = build_prior(model, FairCalibConfig(**cfg), tok)
    per_step = torch.stack([torch.bincount(row, minlength=16) for row in prior.commit_step])  # (P, T)
    assert int(per_step.max()) > 1 and int(per_step.sum()) == 8 * 16  # several commits in some step
    random = build_prior(model, FairCalibConfig(**dict(SMALL, stage1_cache=cache)), tok)
    assert not torch.equal(prior.weights, random.weights)
    prior.save(tmp_path / "p")
    saved = json.loads((tmp_path / "p" / "prior.json").read_text())["settings"]
    assert (saved["stage1_policy"], saved["stage1_threshold"], saved["stage1_cache"]) == ("threshold", 0.5, cache)
    # reused by the same policy; refused by another one (or another threshold), warned with strict_prior=False
    again = build_prior(model, FairCalibConfig(**cfg, prior=str(tmp_path / "p")), tok)
    assert torch.equal(again.weights, prior.weights)
    with pytest.raises(ValueError, match="stage1_policy: prior has 'threshold', run wants 'random'"):
        build_prior(model, FairCalibConfig(**SMALL, prior=str(tmp_path / "p")), tok)
    with pytest.raises(ValueError, match="stage1_threshold: prior has 0.5, run wants 0.9"):
        build_prior(model, FairCalibConfig(**dict(cfg, stage1_threshold=0.9), prior=str(tmp_path / "p")), tok)
    with caplog.at_level(logging.WARNING):
        loose = build_prior(model, FairCalibConfig(**SMALL, strict_prior=False, prior=str(tmp_path / "p")), tok)
    assert torch.equal(loose.weights, prior.weights) and "stage1_policy" in caplog.text


def test_the_factor_policy_reaches_the_rollouts(llada, tok):
    model = _confident(llada)
    prior = build_prior(model, FairCalibConfig(**SMALL, stage1_policy="factor", stage1_factor=1.0), tok)
    assert (prior.settings["stage1_policy"], prior.settings["stage1_factor"]) == ("factor", 1.0)
    assert prior.settings["stage1_threshold"] is None


def test_a_prior_saved_before_the_policy_fields_reads_as_random_commits(tmp_path, llada, tok):
    prior = build_prior(llada, FairCalibConfig(**SMALL), tok)
    for key in ("stage1_policy", "stage1_threshold", "stage1_factor", "stage1_cache"):
        del prior.settings[key]
    prior.save(tmp_path / "old")
    reused = build_prior(llada, FairCalibConfig(**SMALL, prior=str(tmp_path / "old")), tok)
    assert torch.equal(reused.weights, prior.weights)
    with pytest.raises(ValueError, match="stage1_policy: prior has 'random', run wants 'threshold'"):
        build_prior(llada, FairCalibConfig(**SMALL, stage1_policy="threshold", prior=str(tmp_path / "old")), tok)


def test_a_family_without_the_cache_is_refused_naming_the_field(tok):
    model = tiny_llada2(len(tok), tok.mask_token_id)
    with pytest.raises(ValueError, match="stage1_cache='prefix': LLaDA2MoeModelLM has no approximate KV cache"):
        make_plan(model, FairCalibConfig(**SMALL, stage1_cache="prefix"), torch.device("cpu"))


def test_a_canvas_family_refuses_a_serving_policy_and_the_cache():
    from tests.pipeline.test_diffusion_gemma import tiny_gemma

    model = tiny_gemma()
    cfg = dict(num_samples=8, seq_len=32, batch_size=4, w_bits=4, a_bits=16, transform="none")
    with pytest.raises(ValueError, match="stage1_policy='threshold': diffusion-gemma"):
        make_plan(model, FairCalibConfig(**cfg, stage1_policy="threshold"), torch.device("cpu"))
    with pytest.raises(ValueError, match="stage1_cache='prefix'"):
        make_plan(model, FairCalibConfig(**cfg, stage1_cache="prefix"), torch.device("cpu"))
