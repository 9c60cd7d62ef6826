"""The lm-eval backend ``optimum-fair``: registration, model_args, scoring, generation, lm-eval's own entry points."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from optimum_fair.integrations.harness import MODEL_NAME, DiffusionLM, evaluate_tasks  # noqa: E402
from optimum_fair.scoring.sampler import llada_decode  # noqa: E402
from tests.conftest import char_tokenizer, tiny_llada  # noqa: E402
from tests.eval.test_likelihood import MASK, exact_expectation  # noqa: E402

# MASK (39) is the char tokenizer's "J": texts below avoid it


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def llada(tok):
    return tiny_llada(len(tok), MASK)


@pytest.fixture(scope="module")
def llada_dir(tmp_path_factory, llada, tok):
    path = tmp_path_factory.mktemp("harness") / "tiny-llada"
    llada.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def lm(model, tok, **args):
    return DiffusionLM(pretrained=model, tokenizer=tok, **args)


def requests(kind, *args_list, gen=None):
    return [Instance(request_type=kind, doc={}, arguments=args if gen is None else (*args, gen), idx=i)
            for i, args in enumerate(args_list)]


def test_registered_with_lm_eval():
    from lm_eval.api.registry import get_model

    assert MODEL_NAME == "optimum-fair" and get_model("optimum-fair") is DiffusionLM


@pytest.mark.parametrize("bad,field", [
    ("foo=1", "foo"), ("mc_num=100,batch_size=32", "mc_num"), ("dtype=float8", "dtype"),
    ("batch_size=auto", "batch_size"), ("cfg=-1", "cfg"), ("temperature=-0.5", "temperature"),
    ("remasking=sideways", "remasking"), ("max_length=0", "max_length"), ("mask_id=-3", "mask_id"),
])
def test_bad_model_args_name_the_argument(llada_dir, monkeypatch, bad, field):
    import transformers

    def no_loading(*_, **__):
        raise AssertionError("loaded a model before checking model_args")

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", no_loading)
    monkeypatch.setattr("optimum_fair.integrations.loading.load_pretrained", no_loading)
    with pytest.raises(ValueError, match=field):
        DiffusionLM.create_from_arg_string(f"pretrained={llada_dir},{bad}")


def test_cli_batch_size_does_not_override_model_args(llada_dir):
    model = DiffusionLM.create_from_arg_string(f"pretrained={llada_dir},mc_num=8,batch_size=4",
                                               {"batch_size": 1, "device": "cpu"})
    assert (model.settings.mc_num, model.settings.batch_size) == (8, 4)
    assert model.max_length == 64 and model.mask_id == MASK  # the LLaDA config's


def test_a_model_without_mask_token_is_refused(tiny_llama_dir, tok):
    with pytest.raises(ValueError, match="cannot be scored as a masked diffusion LM.*mask_token_id"):
        DiffusionLM(pretrained=str(tiny_llama_dir), tokenizer=tok)


def test_a_causal_lm_folder_loads_with_its_lm_head_and_scores(tmp_path, tiny_llama, tok):
    """A LlamaForCausalLM folder (mask_token_id on its config) scores through its head, not the headless
    LlamaModel that AutoModel gives (issue 32 S3)."""
    tiny_llama.config.mask_token_id = 3
    tiny_llama.save_pretrained(tmp_path / "llama")
    harness = DiffusionLM(pretrained=str(tmp_path / "llama"), tokenizer=tok, mc_num=4, batch_size=4)
    assert type(harness.model).__name__ == "LlamaForCausalLM"
    assert torch.equal(harness.model.lm_head.weight, tiny_llama.lm_head.weight)
    [(value, greedy)] = harness.loglikelihood(requests("loglikelihood", ("ab", " cd")), disable_tqdm=True)
    assert math.isfinite(value) and value < 0 and greedy is False


def test_loglikelihood_is_unbiased_against_enumeration(llada, tok):
    harness = lm(llada, tok, mc_num=16, batch_size=4)
    ctx, target = harness.encode_pair("ab q", " cde")  # trailing space moves to the continuation
    assert (ctx, target) == (harness.tok_encode("ab q"), harness.tok_encode(" cde"))
    ids = torch.tensor(ctx + target)
    exact = exact_expectation(llada, ids, len(ctx), len(target), "llada")
    values = []
    for seed in range(60):
        harness.settings.seed = seed
        values.append(-harness.loglikelihood(requests("loglikelihood", ("ab q ", "cde")), disable_tqdm=True)[0][0])
    mean, se = sum(values) / len(values), float(torch.tensor(values).std()) / math.sqrt(len(values))
    assert se < 0.05 * exact and abs(mean - exact) < 4 * se, (mean, exact, se)


def test_loglikelihood_is_seeded_and_independent_of_order(llada, tok):
    harness = lm(llada, tok, mc_num=8, batch_size=4, seed=7)
    pairs = [("the cat", " sat"), ("the cat", " ran"), ("a dog", " sat on")]
    forward = harness.loglikelihood(requests("loglikelihood", *pairs), disable_tqdm=True)
    backward = harness.loglikelihood(requests("loglikelihood", *pairs[::-1]), disable_tqdm=True)[::-1]
    assert forward == backward and all(greedy is False for _, greedy in forward)
    assert len({v for v, _ in forward}) == 3
    harness.settings.seed = 8
    assert harness.loglikelihood(requests("loglikelihood", pairs[0]), disable_tqdm=True)[0] != forward[0]


def test_long_requests_lose_context_from_the_left(llada, tok, caplog):
    harness = lm(llada, tok, mc_num=8, batch_size=8, max_length=12)
    context, target = "abcdefghiklmnopqrstu", "xyz"
    with caplog.at_level(logging.WARNING, logger="optimum_fair.integrations.harness"):
        long = harness.loglikelihood(requests("loglikelihood", (context, target)), disable_tqdm=True)
    assert "context cut from the left" in caplog.text
    cut = harness.loglikelihood(requests("loglikelihood", (context[-9:], target)), disable_tqdm=True)
    assert long == cut  # 12 - 3 target tokens = the last 9 context characters
    with pytest.raises(ValueError, match="does not fit in max_length=12"):
        harness.loglikelihood(requests("loglikelihood", ("ab", "c" * 12)), disable_tqdm=True)


def test_rolling_loglikelihood_sums_lm_eval_windows(llada, tok):
    harness = lm(llada, tok, mc_num=8, batch_size=8, max_length=8)  # windows of 7 tokens
    text = "abcdefghik"
    tokens, prefix = harness.tok_encode(text), harness.prefix_token_id
    total = harness.loglikelihood_rolling(requests("loglikelihood_rolling", (text,)), disable_tqdm=True)[0]
    # lm-eval's windows: tokens[:7] after the prefix token, then tokens[7:] after tokens[2:7]
    expected = harness.score([prefix], tokens[:7])[0] + harness.score(tokens[2:7], tokens[7:])[0]
    assert total == pytest.approx(expected, rel=1e-12)
    short = harness.loglikelihood_rolling(requests("loglikelihood_rolling", ("abc",)), disable_tqdm=True)[0]
    assert short == harness.score([prefix], harness.tok_encode("abc"))[0]


def test_generate_until_is_the_sampler_cut_at_stops(llada, tok):
    harness = lm(llada, tok, batch_size=1)
    gen = {"until": ["e"], "gen_length": 8, "steps": 4, "block_length": 4}
    got = harness.generate_until(requests("generate_until", ("abc",), gen=gen), disable_tqdm=True)[0]
    ids = torch.tensor([harness.tok_encode("abc")])
    trace = llada_decode(lambda x: llada(x).logits, ids, 8, 4, 4, mask_id=MASK)
    text = tok.decode(trace.generated[0].tolist(), skip_special_tokens=False)
    expected = text[: text.index("e")] if "e" in text else text
    for special in tok.all_special_tokens:
        expected = expected.replace(special, "")
    assert got == expected and "e" not in got


def test_generate_until_batches_equal_plans_only(llada, tok):
    gen_a = {"until": ["\n"], "gen_length": 6, "steps": 6}
    gen_b = {"until": ["\n"], "gen_length": 4, "steps": 2}
    reqs = [Instance(request_type="generate_until", doc={}, arguments=(ctx, g), idx=i)
            for i, (ctx, g) in enumerate([("ab", gen_a), ("xyz", gen_b), ("abcd", gen_a)])]
    batched = lm(llada, tok, batch_size=4).generate_until(reqs, disable_tqdm=True)
    single = lm(llada, tok, batch_size=1).generate_until(reqs, disable_tqdm=True)
    assert batched == single  # left padding with an attention mask changes no answer
    with pytest.raises(ValueError, match="'max_new_tokens'"):
        lm(llada, tok).generate_until(requests("generate_until", ("ab",), gen={"max_new_tokens": 3}))


def test_dream_scores_with_its_shift_and_generates_with_its_sampler(tok):
    from optimum_fair.enums import LikelihoodEstimator
    from optimum_fair.modeling import DreamConfig, DreamModel
    from optimum_fair.scoring.sampler import dream_decode
    from tests.eval.test_likelihood import exact_expectation as exact

    torch.manual_seed(1)
    cfg = DreamConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, mask_token_id=MASK,
                      pad_token_id=2, bos_token_id=1, eos_token_id=1)
    dream = DreamModel(cfg).eval()
    harness = lm(dream, tok, mc_num=16, batch_size=4)
    assert harness.estimator is LikelihoodEstimator.DREAM and harness.adapter.logit_shift == 1
    ctx, target = harness.encode_pair("ab q", " cde")
    expected = exact(dream, torch.tensor(ctx + target), len(ctx), len(target), "dream", shift=1)
    values = []
    for seed in range(40):
        harness.settings.seed = seed
        values.append(-harness.loglikelihood(requests("loglikelihood", ("ab q ", "cde")), disable_tqdm=True)[0][0])
    mean, se = sum(values) / len(values), float(torch.tensor(values).std()) / math.sqrt(len(values))
    assert abs(mean - expected) < 4 * se, (mean, expected, se)
    gen = {"until": ["\n"], "gen_length": 6, "steps": 6}
    got = harness.generate_until(requests("generate_until", ("abc",), gen=gen), disable_tqdm=True)[0]
    trace = dream_decode(lambda x: dream(x).logits, torch.tensor([harness.tok_encode("abc")]), 6, 6, mask_id=MASK,
                         logit_shift=1)
    text = tok.decode(trace.generated[0].tolist(), skip_special_tokens=False)
    text = text.split("\n")[0].split(tok.eos_token)[0]  # the task's stop, then the EOS text
    for special in tok.all_special_tokens:
        text = text.replace(special, "")
    assert got == text


def test_evaluate_tasks_writes_lm_eval_results(llada_dir, tmp_path):
    results = evaluate_tasks(str(llada_dir), ["fair_lee_cloze", "fair_lee_gen"], limit=3, mc_num=4, batch_size=4,
                             output_path=str(tmp_path / "out"))
    assert set(results["results"]) == {"fair_lee_cloze", "fair_lee_gen"}
    assert results["n-samples"]["fair_lee_cloze"]["effective"] == 3
    acc = results["results"]["fair_lee_cloze"]["acc,none"]
    assert acc in (0.0, 1 / 3, 2 / 3, 1.0)
    saved = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    assert saved["results"]["fair_lee_cloze"]["acc,none"] == acc
    assert saved["config"]["model"] == "optimum-fair"


def test_lm_eval_cli_runs_the_backend_on_the_shipped_model(tmp_path):
    import optimum_fair
    from optimum_fair.eval.tasks import write_tasks

    tasks = write_tasks(tmp_path / "tasks")
    command = [sys.executable, "-m", "optimum_fair.integrations.harness", "--model", "optimum-fair",
               "--model_args", f"pretrained={optimum_fair.DEFAULT_MODEL},mc_num=4,batch_size=4",
               "--include_path", str(tasks),
               "--tasks", "fair_lee_choice", "--limit", "2", "--output_path", str(tmp_path / "out")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    saved = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    assert 0.0 <= saved["results"]["fair_lee_choice"]["acc,none"] <= 1.0
    assert "|fair_lee_choice|" in done.stdout  # lm-eval's own table


def test_shipped_model_is_above_chance_on_the_choice_task():
    import optimum_fair

    results = evaluate_tasks(optimum_fair.DEFAULT_MODEL, ["fair_lee_choice"], limit=40, mc_num=8, batch_size=8)
    acc, n = results["results"]["fair_lee_choice"]["acc,none"], 40
    z = 1.96  # Wilson 95 % lower bound above chance (1/4)
    low = (acc + z * z / (2 * n) - z * math.sqrt(acc * (1 - acc) / n + z * z / (4 * n * n))) / (1 + z * z / n)
    assert low > 0.25, acc


def test_cli_eval_tasks_prints_lm_eval_table_and_rows(llada_dir, tmp_path, capsys):
    from optimum_fair.cli.main import main

    out = tmp_path / "rows.json"
    assert main(["eval", str(llada_dir), "--tasks", "fair_lee_cloze", "--limit", "2", "--mc-num", "4",
                 "--batch-size", "4", "--model-args", "seed=3", "--json", str(out)]) == 0
    assert "|fair_lee_cloze|" in capsys.readouterr().out
    rows = json.loads(out.read_text())
    assert set(rows) == {"fair_lee_cloze/acc", "fair_lee_cloze/acc_norm"} and 0 <= rows["fair_lee_cloze/acc"] <= 1
    assert main(["eval", str(llada_dir), "--tasks", "fair_lee_cloze", "--compare", str(llada_dir)]) != 0
    assert "--tasks scores one model: --compare" in capsys.readouterr().err


def test_quantized_model_object_scores_and_its_card_shows_task_rows(tok, tmp_path):
    from huggingface_hub import ModelCard

    from optimum_fair import FairCalibConfig, quantize
    from optimum_fair.eval.tasks import flatten_results
    from optimum_fair.export import save_quantized

    model = tiny_llada(len(tok), MASK)
    quantize(model, FairCalibConfig(rounding="rtn", transform="none", weighting="uniform", dataset="lee",
                                    num_samples=4, seq_len=32, batch_size=4), tokenizer=tok)
    results = evaluate_tasks(model, ["fair_lee_cloze"], limit=3, mc_num=4, batch_size=4, tokenizer=tok)
    rows = flatten_results(results)
    assert results["config"]["model"] == "optimum-fair" and 0 <= rows["fair_lee_cloze/acc"] <= 1
    save_quantized(model, tmp_path / "q", tok, metrics={"W4A4": {"nll": 4.2, **rows}})
    card = ModelCard.load(tmp_path / "q" / "README.md").text
    quality = card.split("## Measured quality", 1)[1].split("##", 1)[0]
    lines = [line for line in quality.splitlines() if line.startswith("|")]  # one table: metrics as rows
    assert lines[0].split("|")[2].strip() == "W4A4" and len({line.count("|") for line in lines}) == 1
    assert {line.split("|")[1].strip() for line in lines[2:]} == {"nll", "fair_lee_cloze/acc",
                                                                 "fair_lee_cloze/acc_norm"}
    assert f"| fair_lee_cloze/acc | {rows['fair_lee_cloze/acc']:.4f} |" in quality and "lm-eval task" in quality


def _no_tasks(monkeypatch):
    """lm-eval's task index must not be built: the check comes first."""
    def no_tasks(*_, **__):
        raise AssertionError("indexed lm-eval's tasks before checking the model")

    monkeypatch.setattr("lm_eval.tasks.TaskManager", no_tasks)


def test_mask_id_outside_the_vocabulary_is_refused_before_tasks_load(llada_dir, llada, tok, monkeypatch):
    """issue 32 L1: mask_id=999999 raised IndexError at the first request, after the tasks loaded."""
    _no_tasks(monkeypatch)
    with pytest.raises(ValueError, match="mask_id=999999 is outside the vocabulary .* token ids"):
        evaluate_tasks(str(llada_dir), ["fair_lee_cloze"], limit=2, mc_num=4, batch_size=4, mask_id=999999)
    with pytest.raises(ValueError, match=f"mask_id={len(tok)} is outside the vocabulary"):
        lm(llada, tok, mask_id=len(tok))  # a model object: its embedding's size


@pytest.mark.parametrize("arg", ["pretrained", "tokenizer"])
def test_a_missing_pretrained_or_tokenizer_path_is_named(llada_dir, tmp_path, monkeypatch, arg):
    """issue 32 W14: transformers' "Repo id must be in the form ..." for a path that does not exist."""
    _no_tasks(monkeypatch)
    missing = str(tmp_path / "nonexistent" / "model")
    args = {"pretrained": str(llada_dir), arg: missing}
    with pytest.raises(ValueError, match=f"{arg}={missing}: no such folder, and not a Hub repo id"):
        evaluate_tasks(args.pop("pretrained"), ["fair_lee_cloze"], limit=2, mc_num=4, batch_size=4, **args)


def test_a_causal_folder_without_tokenizer_is_refused_for_its_mask_first(tiny_llama_dir):
    """issue 32 W15: the tokenizer error came before the intended "cannot be scored" one."""
    with pytest.raises(ValueError, match="cannot be scored as a masked diffusion LM"):
        DiffusionLM(pretrained=str(tiny_llama_dir))


def test_max_length_beyond_the_model_warns(llada, tok, caplog):
    """issue 32 W16: max_length=100000 on a 64-token model was accepted without a word."""
    with caplog.at_level(logging.WARNING, logger="optimum_fair.integrations.harness"):
        harness = lm(llada, tok, max_length=100000)
    assert harness.max_length == 100000 and "exceeds the maximum length" in caplog.text and "(64)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="optimum_fair.integrations.harness"):
        assert lm(llada, tok, max_length=32).max_length == 32
    assert not caplog.text


@pytest.mark.parametrize("limit", [-1, 0, 2.5])
def test_a_limit_that_is_not_a_count_or_fraction_is_refused(llada_dir, monkeypatch, limit):
    """issue 32 W17: --limit -1 / 0 failed inside lm-eval (islice, "did not find any docs")."""
    _no_tasks(monkeypatch)
    with pytest.raises(ValueError, match=f"limit must be .*got {limit}"):
        evaluate_tasks(str(llada_dir), ["fair_lee_cloze"], limit=limit, mc_num=4, batch_size=4)


def test_lm_eval_cli_gets_the_documented_batch_size_unless_given(monkeypatch):
    """issue 32 N4: lm-eval's CLI default batch size (1) became the Monte-Carlo batch; 32 is documented."""
    import lm_eval.__main__

    from optimum_fair.integrations import harness

    seen = []
    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", lambda: seen.append(list(sys.argv[1:])))
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    base = ["--model", "optimum-fair", "--model_args", "pretrained=x", "--tasks", "t"]
    harness.main(base)
    harness.main([*base, "--batch_size", "1"])
    harness.main([*base, "-b", "8"])
    harness.main(["--model", "hf", "--tasks", "t"])
    assert seen == [[*base, "--batch_size", "32"], [*base, "--batch_size", "1"], [*base, "-b", "8"],
                    ["--model", "hf", "--tasks", "t"]]


def test_long_texts_do_not_warn_about_the_tokenizer_maximum(llada, caplog):
    """issue 32 N12: the backend windows the text, so the tokenizer's length warning is noise."""
    from transformers.utils import logging as hf_logging

    tok, other = char_tokenizer(), char_tokenizer()  # a tokenizer gives this warning once: two of them
    tok.model_max_length = other.model_max_length = 8
    harness = lm(llada, tok, mc_num=4, batch_size=4, max_length=8)
    warning = "sequence length is longer than the specified maximum"
    hf_logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            harness.loglikelihood_rolling(requests("loglikelihood_rolling", ("abcdefghiklmnop",)), disable_tqdm=True)
            assert warning not in caplog.text
            other("abcdefghiklmnop")  # the tokenizer itself still warns: the check above could see it
            assert warning in caplog.text
    finally:
        hf_logging.disable_propagation()
