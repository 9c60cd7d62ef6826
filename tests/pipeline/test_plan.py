"""make_plan: every setting of a run resolved once, against the model."""

import pytest
import torch

from optimum_fair import FairCalibConfig
from optimum_fair.enums import Transform
from optimum_fair.nn import FairLinear
from optimum_fair.pipeline.plan import make_plan
from optimum_fair.pipeline.surgery import skeleton
from tests.conftest import tiny_llada

CPU = torch.device("cpu")


def test_the_plan_holds_one_layer_format_and_one_compute_dtype():
    model = tiny_llada(100, 99)  # max length 64
    plan = make_plan(model, FairCalibConfig(rounding="gptq", compute_dtype="float16"), CPU)
    assert plan.calibrate and plan.stage_two.fmt is plan.fmt
    assert plan.compute_dtype == plan.stage_one.compute_dtype == plan.stage_two.compute_dtype == torch.float16
    assert (plan.decode.seq_len, plan.decode.window, plan.decode.mask_id) == (64, 16, 99)
    assert plan.run_config.modules_to_not_convert == plan.skip


def test_a_run_without_calibration_resolves_no_decode_setup():
    plan = make_plan(tiny_llada(100, 99), FairCalibConfig(rounding="rtn", transform="none", steps=3,
                                                          block_length=8), CPU)
    assert not plan.calibrate and plan.decode is None


@pytest.mark.parametrize("input_mode, corrected", [("corrected", True), ("quantized", False), ("fp", False)])
def test_the_plan_says_once_whether_gptq_rounds_towards_the_fp_model(input_mode, corrected):
    plan = make_plan(tiny_llada(100, 99), FairCalibConfig(rounding="gptq", input_mode=input_mode), CPU)
    assert plan.stage_two.corrected is corrected


def test_the_steps_rule_is_checked_on_a_window_resolved_from_the_model():
    """window = 64 // 4 = 16 from the model's length: 2 blocks of 8, which 3 steps do not split evenly."""
    with pytest.raises(ValueError, match=r"steps \(3\) must be a multiple of the number of blocks"):
        make_plan(tiny_llada(100, 99), FairCalibConfig(steps=3, block_length=8), CPU)
    with pytest.raises(ValueError, match=r"steps \(3\) must be a multiple of the number of blocks"):
        FairCalibConfig(steps=3, block_length=8, window=16)  # the same rule, on values given


@pytest.mark.parametrize("transform", list(Transform))
def test_a_skeleton_holds_the_buffers_its_transform_stores(transform):
    fmt = make_plan(tiny_llada(100, 99), FairCalibConfig(transform=transform), CPU).fmt
    layer = skeleton(torch.nn.Linear(16, 4), fmt, torch.float32)
    assert isinstance(layer, FairLinear)
    optional = ("transform_a", "transform_b", "input_scale", "act_clip")
    assert {b for b in optional if getattr(layer, b) is not None} == set(fmt.method.stores)
