"""The method records (`calib.methods`) agree with what the math builds and what a packed layer stores."""

import pytest
import torch
from torch import nn

from optimum_fair.calib.methods import EXPORT_FORMATS, ROUNDINGS, TRANSFORMS, rounding_method
from optimum_fair.calib.transforms import KRON_INITS, CalibLinear, transform_params
from optimum_fair.enums import KronInit, Rounding, Transform


def test_every_choice_has_a_record():
    assert set(TRANSFORMS) == set(Transform) and set(ROUNDINGS) == set(Rounding) and set(KRON_INITS) == set(KronInit)
    assert all(TRANSFORMS[t].transform is t for t in Transform) and all(ROUNDINGS[r].rounding is r for r in Rounding)


@pytest.mark.parametrize("transform", list(Transform))
def test_a_transform_stores_what_its_params_hold(transform):
    method = TRANSFORMS[transform]
    p = transform_params(method, 16, torch.Generator().manual_seed(0), smooth=torch.full((16,), 2.0))
    held = {"transform_a": p.A, "transform_b": p.B, "input_scale": p.s, "act_clip": p.act_clip_logit}
    assert {k for k, v in held.items() if v is not None} == set(method.stores)
    assert bool([q for q in p.parameters() if q.requires_grad and q is not p.act_clip_logit]) == method.learned
    kw = CalibLinear(nn.Linear(16, 4), p, 4, 4, weight_clip=method.clips).export(Rounding.RTN)
    assert {k for k in held if kw[k] is not None} == set(method.stores)  # what FairLinear.from_codes gets
    assert method.formats == (frozenset({"fair"}) if method.online else EXPORT_FORMATS)


def test_an_unknown_rounding_is_named():
    assert rounding_method(Rounding.GPTQ).hessian and not rounding_method(Rounding.RTN).calibrated
    with pytest.raises(ValueError, match=r"rounding must be one of \['rtn', 'gptq'\]"):
        rounding_method("nearest")
