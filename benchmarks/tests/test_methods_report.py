"""The evidence benchmark's statistics (benchmarks/methods_report.py) and prior sharing (benchmarks/methods.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1]  # benchmarks/


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import methods
    import methods_report

    return methods, methods_report


def fake_metrics(flips: list[int], confident_flips: list[int], confident: list[int], decisions: int) -> dict:
    """A methods.py metrics dict for 4 prompts (2 per held-out text) with `decisions` decisions per text."""
    out = {}
    for i, text in enumerate(("wiki-val", "lee")):
        part = slice(2 * i, 2 * i + 2)
        out[f"{text}/flips_per_prompt"] = flips[part]
        out[f"{text}/confident_flips_per_prompt"] = confident_flips[part]
        out[f"{text}/confident_per_prompt"] = confident[part]
        out[f"{text}/decisions"] = decisions
    return out


def test_paired_difference_matches_a_plain_loop(bench):
    _, report = bench
    confident = [10, 6, 8, 4]
    a = {0: fake_metrics([5, 3, 8, 2], [2, 1, 3, 0], confident, 64),
         1: fake_metrics([4, 4, 6, 1], [1, 1, 2, 1], confident, 64)}
    b = {0: fake_metrics([6, 3, 9, 4], [3, 1, 3, 1], confident, 64),
         1: fake_metrics([5, 2, 9, 3], [2, 0, 4, 1], confident, 64)}
    d = report.paired_difference(a, b, resamples=200)
    per_prompt_decisions = 2 * 64 / 4
    total = 0.0
    for s in (0, 1):
        for text in ("wiki-val", "lee"):
            for fa, fb in zip(a[s][f"{text}/flips_per_prompt"], b[s][f"{text}/flips_per_prompt"], strict=True):
                total += (fa - fb) / per_prompt_decisions
    assert d["flip_rate_diff"] == pytest.approx(total / 8)  # 2 seeds x 4 prompts
    conf_diff = sum(sum(a[s][f"{t}/confident_flips_per_prompt"][i] - b[s][f"{t}/confident_flips_per_prompt"][i]
                        for t in ("wiki-val", "lee") for i in range(2)) for s in (0, 1))
    assert d["flip_rate_m0.1_diff"] == pytest.approx(conf_diff / (sum(confident) * 2))
    assert d["seeds"] == [0, 1] and d["prompts"] == 4
    lo, hi = d["flip_rate_ci"]
    assert lo <= d["flip_rate_diff"] <= hi and lo < hi


def test_per_unit_metrics_are_paired_like_a_plain_loop(bench):
    """NLL per window, set disagreement and post-commit per prompt: mean of A - B over seeds and units,
    an interval around it, and nothing for a metric one side did not keep."""
    import torch

    _, report = bench
    gen = torch.Generator().manual_seed(0)

    def runs(offset):
        out = {}
        for s in (0, 1):
            m = fake_metrics([1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1], 8)
            for text in ("wiki-val", "lee"):
                m[f"{text}/nll_per_window"] = (torch.rand(5, generator=gen) + offset).tolist()
                m[f"{text}/set_disagreement_per_prompt"] = torch.rand(2, generator=gen).tolist()
            out[s] = m
        return out

    a, b = runs(0.5), runs(0.0)
    d = report.paired_difference(a, b, resamples=300)
    plain = [a[s][f"{t}/nll_per_window"][i] - b[s][f"{t}/nll_per_window"][i]
             for s in (0, 1) for t in ("wiki-val", "lee") for i in range(5)]
    assert d["nll_diff"] == pytest.approx(sum(plain) / len(plain)) and d["nll_units"] == 10
    lo, hi = d["nll_ci"]
    assert lo < d["nll_diff"] < hi and 0 < lo  # every window is 0.5 worse on average: excludes zero
    sets = [a[s][f"{t}/set_disagreement_per_prompt"][i] - b[s][f"{t}/set_disagreement_per_prompt"][i]
            for s in (0, 1) for t in ("wiki-val", "lee") for i in range(2)]
    assert d["set_disagreement_diff"] == pytest.approx(sum(sets) / len(sets))
    assert "mean_disagree_diff" not in d  # no post-commit lists on either side


def test_a_constant_difference_has_a_zero_width_interval(bench):
    _, report = bench
    a = {0: fake_metrics([3, 3, 3, 3], [1, 1, 1, 1], [5, 5, 5, 5], 32)}
    b = {0: fake_metrics([5, 5, 5, 5], [1, 1, 1, 1], [5, 5, 5, 5], 32)}
    d = report.paired_difference(a, b, resamples=100)
    assert d["flip_rate_diff"] == pytest.approx(-2 / 16)
    assert d["flip_rate_ci"] == pytest.approx([-2 / 16, -2 / 16])
    assert d["flip_rate_m0.1_ci"] == pytest.approx([0.0, 0.0])
    with pytest.raises(ValueError, match="no seed in common"):
        report.paired_difference(a, {1: b[0]})


def test_every_pair_names_cells_of_the_benchmark(bench):
    methods, report = bench
    for method, base in report.PAIRS:
        assert method in methods.METHODS and base in methods.METHODS, (method, base)
        fields, base_fields = methods.METHODS[method], methods.METHODS[base]
        # a pair differs in the weighting/prior or in the Stage II inputs, never in the base calibration
        assert (fields["rounding"], fields["transform"]) == (base_fields["rounding"], base_fields["transform"])
    fair_study = [m for m in methods.STUDY if methods.METHODS[m]["weighting"] == "fair"]
    assert set(fair_study) <= {m for m, _ in report.PAIRS}


class _Prior:
    def __init__(self, value: float):
        self.value = value

    def save(self, path):
        path = Path(path)
        path.mkdir(parents=True)
        (path / "prior.json").write_text(str(self.value))
        return path


def test_priors_are_shared_through_the_cache_and_the_first_one_stays(bench, tmp_path):
    methods, _ = bench
    args = argparse.Namespace(prior_cache=str(tmp_path / "priors"))
    (tmp_path / "priors").mkdir()
    assert methods.cached_prior(args, "seed0") is None
    methods.store_prior(args, "seed0", _Prior(1.0))
    methods.store_prior(args, "seed0", _Prior(2.0))  # a second process finishing later
    path = methods.cached_prior(args, "seed0")
    assert path is not None and (Path(path) / "prior.json").read_text() == "1.0"
    assert sorted(p.name for p in (tmp_path / "priors").iterdir()) == ["prior-seed0"]  # no temp dir left


def test_the_study_slices_run_only_cells_of_the_benchmark(bench):
    methods, _ = bench
    import study

    jobs = study.slices([0, 1], extras=True)
    assert len(jobs) == 12 and len({name for name, _, _ in jobs}) == 12
    for _, job_args, _ in jobs:
        cells = job_args[job_args.index("--methods") + 1:]
        assert cells and set(cells) <= set(methods.METHODS), cells
    variants = {m for m in methods.STUDY if m.startswith("fair-quarot-gptq-") and "masked" not in m and "n128" not in m}
    assert set(study.VARIANTS) == variants
    # every study cell is in some slice: all of them with the extras
    covered = {cell for _, job_args, _ in jobs for cell in job_args[job_args.index("--methods") + 1:]}
    assert set(methods.STUDY) <= covered


def test_the_prior_phase_builds_every_rollout_setting_the_cells_use(bench):
    """Phase 1 must leave no fair cell to roll out its own probes (it would then run Stage I again)."""
    methods, _ = bench
    import study

    def cells(args):
        return args[args.index("--methods") + 1:]

    needed = {methods.prior_key(m, s) for _, a, _ in study.slices([0, 1], extras=True) for m in cells(a)
              for s in (int(a[a.index("--seeds") + 1]),) if methods.METHODS[m]["weighting"] == "fair"}
    built = [methods.prior_key(m, int(a[a.index("--seeds") + 1])) for _, a, _ in study.prior_jobs([0, 1])
             for m in cells(a)]
    assert set(built) == needed and len(built) == len(set(built))  # each built once, none missing or spare


def test_merging_keeps_a_reproduced_cell_once_and_refuses_a_conflicting_one(bench, tmp_path):
    import json

    _, report = bench
    cell = {"method": "gptq", "bits": "w4a4", "seed": 0, "metrics": fake_metrics([1, 2, 3, 4], [0, 1, 0, 1],
                                                                                  [2, 2, 2, 2], 32)}
    fp = {"method": "fp", "bits": "-", "seed": None, "metrics": {}}
    other = {**cell, "metrics": fake_metrics([1, 2, 3, 5], [0, 1, 0, 1], [2, 2, 2, 2], 32)}
    for name, runs in (("a", [fp, cell]), ("b", [fp, cell]), ("c", [other])):
        (tmp_path / f"{name}.json").write_text(json.dumps({"runs": runs}))
    merged = report.load_runs([str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    assert [r["method"] for r in merged] == ["fp", "gptq"]
    with pytest.raises(ValueError, match="other results"):
        report.load_runs([str(tmp_path / "a.json"), str(tmp_path / "c.json")])


@pytest.mark.parametrize("flag", ["--workers=0", "--num-prompts=0", "--post-commit-prompts=-1"])
def test_the_study_refuses_bad_settings_before_any_work(bench, tmp_path, flag, capsys):
    import study

    with pytest.raises(SystemExit):
        study.main([flag, "--work", str(tmp_path / "work")])
    assert flag.split("=")[0] in capsys.readouterr().err
    assert not (tmp_path / "work").exists()  # nothing started


def test_holm_matches_the_step_down_definition(bench):
    _, report = bench
    p = [0.01, 0.04, 0.03, 0.005]
    # sorted 0.005, 0.01, 0.03, 0.04 -> 4x, 3x, 2x, 1x, running max
    assert report.holm(p) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert report.holm([0.5, 0.9]) == [1.0, 1.0]
    assert report.bootstrap_p(torch.tensor([1.0, 2.0, 3.0, -1.0])) == pytest.approx(0.5)
