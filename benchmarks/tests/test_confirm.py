"""benchmarks/confirm.py: the paired statistics against a plain loop, and specs checked before work."""

import json
import math
from pathlib import Path

import pytest
import torch

from benchmarks.confirm import load_spec, paired_flip_difference


def _run(flips, conf_flips, conf, decisions):
    return {"t/flips_per_prompt": flips, "t/confident_flips_per_prompt": conf_flips,
            "t/confident_per_prompt": conf, "t/decisions": decisions}


def test_paired_difference_matches_a_plain_loop():
    g = torch.Generator().manual_seed(0)
    prompts, per_prompt = 12, 32
    conf = torch.randint(5, 20, (prompts,), generator=g).tolist()
    a = [_run(torch.randint(0, 10, (prompts,), generator=g).tolist(), [min(c, 3) for c in conf], conf,
              prompts * per_prompt) for _ in range(3)]
    b = [_run(torch.randint(0, 10, (prompts,), generator=g).tolist(), [min(c, 2) for c in conf], conf,
              prompts * per_prompt) for _ in range(3)]
    res = paired_flip_difference(a, b, "t", resamples=400)
    diffs = [sum(ra["t/flips_per_prompt"][p] - rb["t/flips_per_prompt"][p] for ra, rb in zip(a, b, strict=True)) / 3
             for p in range(prompts)]
    assert res["all"]["diff"] == pytest.approx(100 * sum(diffs) / (prompts * per_prompt))
    assert res["m0.1"]["diff"] == pytest.approx(100 * prompts / sum(conf))  # one more flip per prompt on A
    mean = sum(diffs) / prompts
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (prompts - 1)) / per_prompt
    assert res["all"]["mde"] == pytest.approx(100 * 2.801585 * sd / math.sqrt(prompts), rel=1e-4)
    lo, hi = res["all"]["ci"]
    assert lo <= res["all"]["diff"] <= hi


def test_spec_is_checked_before_any_work(tmp_path):
    spec = json.loads(open("benchmarks/confirm/beta3_vs_uniform.json").read())
    assert load_spec("benchmarks/confirm/beta3_vs_uniform.json")["name"] == "beta3-vs-uniform"
    bad = dict(spec, a={"weighting": "fair", "early_boost": -1.0})
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="early_boost"):
        load_spec(str(tmp_path / "bad.json"))
    (tmp_path / "missing.json").write_text(json.dumps({k: v for k, v in spec.items() if k != "seeds"}))
    with pytest.raises(ValueError, match="missing keys \\['seeds'\\]"):
        load_spec(str(tmp_path / "missing.json"))


def test_a_setting_longer_than_the_model_is_refused_before_work():
    import optimum_fair
    from benchmarks.confirm import check_fits

    spec = load_spec("benchmarks/confirm/beta1_vs_uniform.json")
    check_fits(spec, optimum_fair.DEFAULT_MODEL)  # the committed specs fit the shipped model
    too_long = dict(spec, settings=[dict(spec["settings"][0], seq_len=256, window=128)])
    with pytest.raises(ValueError, match="seq_len \\(256\\) exceeds the model's maximum length \\(128\\)"):
        check_fits(too_long, optimum_fair.DEFAULT_MODEL)


def test_several_specs_are_all_checked_before_the_first_run(tmp_path, monkeypatch):
    from benchmarks.confirm import main

    good = str(Path("benchmarks/confirm/beta1_vs_uniform.json").resolve())
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "x"}))
    monkeypatch.chdir(tmp_path)  # a run would write benchmarks/results/ here
    with pytest.raises(ValueError, match="missing keys"):
        main([good, str(bad), "--quick"])
    assert not (tmp_path / "benchmarks").exists()
    with pytest.raises(SystemExit):  # --out names one file
        main([good, good, "--out", str(tmp_path / "o.json")])


def test_the_model_card_quotes_the_committed_confirmatory_results():
    """The card's evidence table is the numbers in benchmarks/results/confirm_*.json, to two decimals, and
    what it says of them holds: no interval below zero; beta = 3's second run above zero."""
    from optimum_fair.export.card import EVIDENCE

    rows = {"beta1-vs-uniform": "prior, beta = 1 - uniform", "beta3-vs-uniform": "prior, beta = 3 - uniform",
            "masked-vs-text": "masked (decode-like) Stage II inputs - text"}
    for name, label in rows.items():
        cells = []
        for suffix in ("", "-2settings"):
            res = json.loads(Path(f"benchmarks/results/confirm_{name}{suffix}.json").read_text())["result"]["all"]
            lo, hi = res["ci"]
            cells.append(f"{res['diff']:+.2f} [{lo:+.2f}, {hi:+.2f}]")
            assert hi > 0  # "no interval of the difference below zero"
            assert (lo > 0) == (name == "beta3-vs-uniform" and suffix == "-2settings")
        assert f"| {label} | {cells[0]} | {cells[1]} |" in EVIDENCE


def _served_spec(tmp_path, **policy):
    spec = json.loads(open("benchmarks/confirm/beta1_vs_uniform.json").read())
    spec = dict(spec, a={"weighting": "fair", "stage1_policy": "threshold", "stage1_threshold": 0.7},
                policy={"decode": "threshold", "threshold": 0.7, **policy})
    path = tmp_path / "served.json"
    path.write_text(json.dumps(spec))
    return str(path)


def test_a_bad_policy_is_refused_by_name_before_any_work(tmp_path, monkeypatch):
    import benchmarks.confirm as confirm

    assert load_spec(_served_spec(tmp_path))["policy"] == {"decode": "threshold", "threshold": 0.7}
    assert "policy" not in load_spec("benchmarks/confirm/beta1_vs_uniform.json")  # old specs unchanged
    monkeypatch.setattr(confirm, "run", lambda *a, **k: pytest.fail("a run started"))
    for policy, message in (({"temperature": 0.5}, r"unknown policy keys \['temperature'\]"),
                            ({"threshold": 1.5}, "threshold must be in"),
                            ({"decode": "fastest"}, "decode"),
                            ({"cache": "triple"}, "cache")):
        with pytest.raises(ValueError, match=message):
            confirm.main([_served_spec(tmp_path, **policy), "--quick"])
    spec = json.loads(open(_served_spec(tmp_path)).read())
    (tmp_path / "list.json").write_text(json.dumps(dict(spec, policy=["threshold"])))
    with pytest.raises(ValueError, match="policy must be an object"):
        load_spec(str(tmp_path / "list.json"))


def test_the_policy_reaches_the_traces_the_evaluation_and_side_a_only_gets_its_prior(tmp_path, monkeypatch):
    """An end-to-end run with quantization replaced by the identity: the teacher's traces and both sides'
    evaluations are under the spec's policy, side A's config carries the Stage I policy and B's does not, and
    a model scored against its own trajectories differs from itself by exactly zero."""
    import benchmarks.confirm as confirm
    import optimum_fair

    configs, traces = [], []
    monkeypatch.setattr(confirm, "quantize", lambda model, cfg, tokenizer=None: configs.append(cfg) or model)
    real = confirm.build_teacher_traces
    monkeypatch.setattr(confirm, "build_teacher_traces", lambda *a, **k: traces.append(real(*a, **k)) or traces[-1])
    spec = load_spec(_served_spec(tmp_path))
    spec = dict(spec, seeds=[0], num_prompts=3, gen_length=8)
    out = confirm.run(spec, optimum_fair.DEFAULT_MODEL, threads=1, quick=True)
    assert [t.policy for t in traces[0].values()] == ["llada/low_confidence+threshold0.7"]
    assert [(c.stage1_policy, c.stage1_threshold) for c in configs] == [("threshold", 0.7), ("random", 0.9)]
    assert [r["decode_policy"] for r in out["runs"]] == ["threshold0.7", "threshold0.7"]
    assert [r["flip_rate"] for r in out["runs"]] == [0.0, 0.0]
    assert out["result"]["all"]["diff"] == 0.0 and out["result"]["all"]["ci"] == [0.0, 0.0]
    assert "policy threshold0.7" in confirm.report(out)


def test_agreement_picks_the_most_parallel_policy_that_keeps_the_fp_answer():
    """An unreachable threshold (1.0) is the one-per-step decode itself; a low one commits more per step and
    its agreement is the share of tokens equal to the one-per-step decode, computed here directly."""
    import optimum_fair
    from benchmarks.confirm import policy_agreement
    from optimum_fair.eval.evaluate import build_teacher_traces

    spec = dict(load_spec("benchmarks/confirm/served_prior_vs_uniform.json"), num_prompts=4, gen_length=16)
    policies = ({"decode": "threshold", "threshold": 1.0}, {"decode": "threshold", "threshold": 0.05})
    out = policy_agreement(spec, optimum_fair.DEFAULT_MODEL, threads=1, policies=policies)
    same, low = out["rows"]
    assert same["agree_fp_one_per_step"] == 1.0 and same["steps_per_token"] == 1.0
    from transformers import AutoModel, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(optimum_fair.DEFAULT_MODEL)
    teacher = AutoModel.from_pretrained(optimum_fair.DEFAULT_MODEL).eval()
    design = dict(texts=["lee-test"], num_prompts=4, gen_length=16, block_length=16)
    base = build_teacher_traces(teacher, tok, **design)["lee-test"].generated
    fast = build_teacher_traces(teacher, tok, **design, **policies[1])["lee-test"]
    assert low["agree_fp_one_per_step"] == float((fast.generated == base).double().mean())
    assert low["steps_per_token"] == fast.steps_per_token() < 1.0
    want = policies[1] if low["agree_fp_one_per_step"] >= 0.9 else policies[0]
    assert out["most_parallel_with_agreement_0.9"] == want
    with pytest.raises(ValueError, match="unknown policy keys"):
        policy_agreement(spec, optimum_fair.DEFAULT_MODEL, threads=1, policies=({"rule": "threshold"},))
