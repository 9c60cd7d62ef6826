"""benchmarks/import_time.py's summary: ratios are taken round by round, then the median."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1]  # benchmarks/


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import import_time

    yield import_time
    sys.modules.pop("import_time", None)


def test_ratios_pair_each_round_with_the_baselines(bench):
    times = {bench.BASELINE: [1.0, 4.0, 2.0], bench.FLOOR: [2.0, 8.0, 4.0], "case": [2.0, 4.0, 6.0]}
    rows = {r["case"]: r for r in bench.summarize(times)}
    assert rows["case"]["ratio"] == 2.0  # per round 2, 1, 3
    assert rows["case"]["ratio_floor"] == 1.0  # per round 1, 0.5, 1.5
    assert rows["case"]["median_s"] == 4.0 and rows["case"]["min_s"] == 2.0 and rows["case"]["runs"] == 3
    assert rows[bench.BASELINE]["ratio"] == 1.0 and rows[bench.FLOOR]["ratio_floor"] == 1.0
    assert bench.median_ratio([1.0, 9.0, 1.0], [1.0, 1.0, 3.0]) == 1.0  # 1, 9, 1/3: not 11/5


def test_table_has_a_row_per_case(bench):
    rows = bench.summarize({bench.BASELINE: [1.0], bench.FLOOR: [2.0], "x": [0.5]})
    lines = bench.table(rows).splitlines()
    assert len(lines) == 2 + 3 and lines[-1] == "| x | 0.50 | 0.50 | 0.50 | 0.25 |"


def test_every_case_runs_in_a_fresh_interpreter(bench):
    assert bench.wall_time("import sys; assert 'optimum_fair' not in sys.modules") > 0
