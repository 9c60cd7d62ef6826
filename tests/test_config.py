import json
import re

import pytest

from optimum_fair import FairCalibConfig, Rounding, Transform, Weighting
from optimum_fair.enums import CacheMode, ProbePolicy, WeightGrid

CONFIGS = [
    dict(),
    dict(w_bits=8, a_bits=8),
    dict(w_bits=4, a_bits=16, group_size=32),
    dict(rounding="gptq", transform="hadamard", weighting="uniform"),
    dict(num_probes=64, window=64, block_length=16, steps=64, early_boost=3.0, reliability="margin",
         reliability_weight=0.5, floor=0.1, boost_schedule="late", frontier_weight=0.0),
    dict(dataset="lee", num_samples=8, seq_len=128, epochs=2, lr=1e-3, batch_size=2, tokenizer="some/path",
         modules_to_not_convert=["lm_head", "model.embed"], input_mode="fp"),  # push_to_hub: not serialised
    dict(stage1_policy="threshold", stage1_threshold=0.5, stage1_cache="prefix"),  # issue 34
    dict(stage1_policy="factor", stage1_factor=2.0),
]


@pytest.mark.parametrize("kwargs", CONFIGS)
def test_round_trip(kwargs):
    cfg = FairCalibConfig(**kwargs)
    d = cfg.to_dict()
    assert FairCalibConfig.from_dict(d) == cfg
    again = FairCalibConfig.from_dict(json.loads(json.dumps(d)))
    assert again == cfg
    assert again.to_dict() == d
    assert json.loads(cfg.to_json_string()) == d


def test_stage_one_defaults_are_the_papers_random_commits_without_a_cache():
    assert (FairCalibConfig().stage1_policy, FairCalibConfig().stage1_cache) == (ProbePolicy.RANDOM, CacheMode.NONE)
    cfg = FairCalibConfig(stage1_policy="factor", stage1_cache="prefix")
    assert cfg.stage1_policy is ProbePolicy.FACTOR and cfg.stage1_cache is CacheMode.PREFIX


def test_enums_accept_strings():
    cfg = FairCalibConfig(rounding="gptq", transform="flatquant", weighting="uniform")
    assert cfg.rounding is Rounding.GPTQ and cfg.transform is Transform.FLATQUANT
    assert cfg.weighting is Weighting.UNIFORM and cfg.weighting == "uniform"
    assert cfg.to_dict()["rounding"] == "gptq"


BAD = [
    ("w_bits", dict(w_bits=3)),
    ("w_bits", dict(w_bits="4")),
    ("w_bits", dict(w_bits=True)),
    ("a_bits", dict(a_bits=2)),
    ("group_size", dict(group_size=0)),
    ("group_size", dict(group_size=-2)),
    ("group_size", dict(group_size=1.5)),
    ("rounding", dict(rounding="awq")),
    ("transform", dict(transform="quarot")),
    ("weighting", dict(weighting="fancy")),
    ("reliability", dict(reliability="entropy")),
    ("boost_schedule", dict(boost_schedule="middle")),
    ("input_mode", dict(input_mode="masked")),
    ("num_probes", dict(num_probes=-1)),
    ("num_probes", dict(num_probes=0)),
    ("window", dict(window=-64)),
    ("block_length", dict(block_length=0)),
    ("steps", dict(steps=-1)),
    ("early_boost", dict(early_boost=-1.0)),
    ("early_boost", dict(early_boost=float("nan"))),
    ("reliability_weight", dict(reliability_weight=-0.1)),
    ("floor", dict(floor=-0.01)),
    ("frontier_weight", dict(frontier_weight=-1.0)),
    ("frontier_weight", dict(frontier_weight=0.0, reliability_weight=0.0)),
    ("floor", dict(floor=2.0)),
    ("num_samples", dict(num_samples=-5)),
    ("seq_len", dict(seq_len=0)),
    ("epochs", dict(epochs=0)),
    ("lr", dict(lr=-1e-3)),
    ("batch_size", dict(batch_size=0)),
    ("batch_size", dict(batch_size=8, num_samples=4)),
    ("damp", dict(damp=-1)),
    ("act_order", dict(act_order="yes")),
    ("window", dict(window=48, block_length=32)),
    ("steps", dict(window=64, block_length=32, steps=3)),
    ("window", dict(window=256, seq_len=128)),
    ("dataset", dict(dataset=123)),
    ("modules_to_not_convert", dict(modules_to_not_convert="lm_head")),
    ("push_to_hub", dict(push_to_hub=1)),
    ("version", dict(version=99)),
    ("version", dict(version=0)),
    ("version", dict(version=-5)),
    ("cache_dir", dict(cache_dir="")),
    ("cache_dir", dict(cache_dir="  ")),
    ("weight_grid", dict(weight_grid="asymmetric")),
    ("quant_method", dict(quant_method="gptq")),
    ("stage1_policy", dict(stage1_policy="greedy")),
    ("stage1_threshold", dict(stage1_threshold=0.0)),
    ("stage1_threshold", dict(stage1_threshold=1.5)),
    ("stage1_threshold", dict(stage1_threshold=float("nan"))),
    ("stage1_threshold", dict(stage1_threshold="0.9")),
    ("stage1_factor", dict(stage1_factor=0.0)),
    ("stage1_factor", dict(stage1_factor=-1.0)),
    ("stage1_cache", dict(stage1_cache="dual")),
    ("stage1_cache", dict(stage1_cache="kv")),
]


@pytest.mark.parametrize("field,kwargs", BAD, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD)])
def test_bad_value_names_field(field, kwargs):
    with pytest.raises(ValueError, match=field):
        FairCalibConfig(**kwargs)


def test_unknown_key_is_named():
    with pytest.raises(ValueError, match="bogus_field"):
        FairCalibConfig.from_dict({"bogus_field": 1})


def test_asymmetric_needs_a_fixed_transform_and_no_gguf_type():
    with pytest.raises(ValueError, match="sym=False needs transform 'none' or 'hadamard', got 'flatquant'"):
        FairCalibConfig(sym=False)
    with pytest.raises(ValueError, match="sym=False with gguf_type"):
        FairCalibConfig(sym=False, transform="none", gguf_type="Q4_0")
    assert FairCalibConfig(sym=False, transform="none", group_size=32).sym is False


def test_resolved_lengths():
    cfg = FairCalibConfig()
    assert cfg.resolved_seq_len(128) == 128
    assert cfg.resolved_seq_len(4096) == 1024
    assert cfg.resolved_window(1024) == 256
    assert cfg.resolved_window(128) == 32
    with pytest.raises(ValueError, match="seq_len"):
        FairCalibConfig(seq_len=256).resolved_seq_len(128)


def test_in_memory_data_not_serialised():
    class Tok:
        name_or_path = "org/tok"

    cfg = FairCalibConfig(dataset=["a text", "another"], tokenizer=Tok())
    d = cfg.to_dict()
    assert d["dataset"] is None and d["tokenizer"] == "org/tok"  # a Hub id is public


def test_machine_local_settings_are_never_serialised_nor_read_back(tmp_path, caplog):
    """cache_dir, prior and a local tokenizer path are this machine's (issue 32, S5 / W27)."""
    local = tmp_path / "home_alice_secret"
    (local / "tok").mkdir(parents=True)
    cfg = FairCalibConfig(cache_dir=str(local / "cache"), prior=str(local / "prior"), tokenizer=str(local / "tok"))
    d = cfg.to_dict()
    assert d["cache_dir"] is None and d["prior"] is None and d["tokenizer"] is None
    assert "home_alice_secret" not in json.dumps(d)
    assert cfg.cache_dir == str(local / "cache")  # the run itself still uses them
    for tok in ("path/to/tok", "./tok", "/abs/tok", str(local / "tok")):  # local paths, existing or not
        assert FairCalibConfig(tokenizer=tok).to_dict()["tokenizer"] is None, tok
    assert FairCalibConfig(push_to_hub="alice/model").to_dict()["push_to_hub"] is None  # issue 32 item 4
    published = {**FairCalibConfig().to_dict(), "cache_dir": "../escaped_cache", "prior": "/home/alice/prior",
                 "push_to_hub": "alice/model"}
    with caplog.at_level("WARNING"):
        loaded = FairCalibConfig.from_dict(published)  # a config.json written by an older version
    assert loaded.cache_dir is None and loaded.prior is None and loaded.push_to_hub is None
    assert "ignoring the machine-local cache_dir, prior, push_to_hub" in caplog.text


@pytest.mark.parametrize("field, value", [("w_bits", 4.0), ("a_bits", 8.0), ("tokenizer", 123)])
def test_values_of_the_wrong_type_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        FairCalibConfig(**{field: value})


def test_weight_grid_defaults_to_full_and_version_one_reads_symmetric():
    """Format version 2 added weight_grid; a version-1 config (no such key) was made on max|w| / 7."""
    assert FairCalibConfig().weight_grid == "full" and FairCalibConfig().version == 2
    old = {k: v for k, v in FairCalibConfig().to_dict().items() if k != "weight_grid"}
    assert FairCalibConfig.from_dict({**old, "version": 1}).weight_grid == "symmetric"
    assert FairCalibConfig.from_dict({**old, "version": 2}).weight_grid == "full"  # v2 without it: default
    kept = FairCalibConfig.from_dict({**old, "version": 1, "weight_grid": "full"})
    assert kept.weight_grid == "full" and kept.to_dict()["version"] == 1


def test_is_fair_calib_reads_dicts_and_config_objects():
    from transformers import GPTQConfig

    from optimum_fair.config import is_fair_calib

    assert is_fair_calib(FairCalibConfig()) and is_fair_calib(FairCalibConfig().to_dict())
    assert not is_fair_calib({"quant_method": "gptq"}) and not is_fair_calib(None) and not is_fair_calib({})
    assert not is_fair_calib(GPTQConfig(bits=4))


def test_gguf_type_sets_the_target_grid_and_round_trips():
    cfg = FairCalibConfig(gguf_type="Q4_0", rounding="gptq")
    assert (cfg.w_bits, cfg.a_bits, cfg.group_size) == (4, 16, 32)
    assert cfg.weight_grid is WeightGrid.SEARCH and cfg.transform is Transform.NONE
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["gguf_type"] == "Q4_0"
    assert FairCalibConfig.from_dict(d) == cfg
    q8 = FairCalibConfig(gguf_type="Q8_0", w_bits=8, group_size=32)  # the type's own values are accepted
    assert (q8.w_bits, q8.group_size) == (8, 32)
    assert FairCalibConfig().to_dict()["gguf_type"] is None


@pytest.mark.parametrize("kwargs, named", [
    (dict(gguf_type="Q4_0", w_bits=8), "w_bits=4"),
    (dict(gguf_type="Q4_0", group_size=128), "group_size=32"),
    (dict(gguf_type="Q8_0", a_bits=8), "a_bits=16"),
    (dict(gguf_type="Q4_0", transform="hadamard"), "transform='none'"),
    (dict(gguf_type="Q4_0", weight_grid="symmetric"), "weight_grid='search'"),
    (dict(gguf_type="Q4_K"), "gguf_type must be one of ['Q4_0', 'Q8_0', 'Q4_K_M', 'Q5_K_M', 'Q6_K', 'IQ4_NL', "
                             "'IQ4_XS']"),
    (dict(gguf_type="Q3_X"), "gguf_type"),
])
def test_gguf_type_conflicts_are_refused_by_field(kwargs, named):
    with pytest.raises(ValueError, match=re.escape(named)):
        FairCalibConfig(**kwargs)
