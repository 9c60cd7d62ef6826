"""Fuzzed configs: random dicts through `FairCalibConfig.from_dict` and random flag lists through the CLI
parser either give a config that round-trips exactly and holds only in-range values, or raise
ValueError / NotImplementedError naming a field (argparse's own usage error for a flag it cannot parse).
Seeded (derandomized), a few hundred cases each."""

from __future__ import annotations

import dataclasses
import math
from enum import Enum

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from optimum_fair import FairCalibConfig
from optimum_fair.cli import build_parser
from optimum_fair.cli.flags import config_from_args, flag

FIELDS = [f.name for f in dataclasses.fields(FairCalibConfig)]
ENUM_VALUES = ["rtn", "gptq", "none", "hadamard", "flatquant", "fair", "uniform", "prob", "margin",
               "neg_entropy", "early", "flat", "late", "quantized", "fp", "text", "masked"]
VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 300), st.sampled_from([4, 8, 16, 32, 64, 128, -1, 0]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(ENUM_VALUES), st.text(max_size=6),
    st.lists(st.sampled_from(["lm_head", "x", 3]), max_size=2),
)
FUZZ = settings(max_examples=300, derandomize=True, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def _in_range(cfg: FairCalibConfig) -> None:
    """What an accepted config may hold (the checks of the docstring, restated independently)."""
    assert cfg.w_bits in (4, 8) and type(cfg.w_bits) is int
    assert cfg.a_bits in (4, 8, 16) and type(cfg.a_bits) is int
    assert cfg.group_size == -1 or (type(cfg.group_size) is int and cfg.group_size > 0)
    for name in ("num_probes", "num_samples", "epochs", "batch_size"):
        assert type(getattr(cfg, name)) is int and getattr(cfg, name) > 0, name
    for name in ("window", "block_length", "steps", "seq_len"):
        v = getattr(cfg, name)
        assert v is None or (type(v) is int and v > 0), name
    for name in ("early_boost", "frontier_weight", "floor", "lr", "clip_lr", "damp"):
        v = getattr(cfg, name)
        assert isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0, name
    assert cfg.floor <= 1 and cfg.batch_size <= cfg.num_samples
    for f in ("rounding", "transform", "weighting", "reliability", "boost_schedule", "input_mode", "calib_inputs"):
        assert isinstance(getattr(cfg, f), Enum), f


def _names_a_field(err: Exception, keys) -> bool:
    text = str(err)
    return any(k in text for k in keys) or any(f in text for f in FIELDS)


@FUZZ
@given(st.dictionaries(st.sampled_from(FIELDS + ["bogus", "w_bit"]), VALUES, max_size=6))
def test_random_dicts_round_trip_or_name_a_field(d):
    try:
        cfg = FairCalibConfig.from_dict(d)
    except (ValueError, NotImplementedError) as err:
        assert _names_a_field(err, d), f"{d} -> {err}"
        return
    _in_range(cfg)
    again = FairCalibConfig.from_dict(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()


CLI_FIELDS = ["w_bits", "a_bits", "group_size", "rounding", "transform", "weighting", "num_probes", "window",
              "block_length", "steps", "early_boost", "floor", "num_samples", "batch_size", "epochs", "lr",
              "seq_len", "reliability", "calib_inputs", "seed", "act_order", "damp"]
TOKENS = st.one_of(st.sampled_from(ENUM_VALUES), st.integers(-2, 300).map(str),
                   st.sampled_from(["0.5", "nan", "inf", "-1.5", "none", "x", "1e-3"]))


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(CLI_FIELDS), TOKENS), max_size=5))
def test_random_flag_lists_give_a_config_or_a_named_error(pairs):
    argv = ["quantize", "--output-dir", "out"]
    for name, value in pairs:
        argv += [flag(name)] if name == "act_order" else [flag(name), value]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # argparse: a value its type cannot parse (prints the flag's name)
        assert stop.code == 2
        return
    try:
        cfg = config_from_args(args, args.config_flag_names)
    except (ValueError, NotImplementedError) as err:
        assert _names_a_field(err, [n for n, _ in pairs]), f"{argv} -> {err}"
        return
    _in_range(cfg)
    assert FairCalibConfig.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()


def test_the_fuzz_reaches_both_outcomes():
    # the two properties above must be able to fail: valid and invalid inputs both occur
    assert FairCalibConfig.from_dict({"w_bits": 8, "a_bits": 8}).w_bits == 8
    with pytest.raises(ValueError, match="w_bits"):
        FairCalibConfig.from_dict({"w_bits": 3})
