import torch

from optimum_fair.calib.gptq import gptq_quantize
from optimum_fair.ops import quantize_weight, weight_scale


def test_gptq_codes_sit_on_the_stored_half_precision_grid():
    # with H = I, GPTQ is RTN; with scale_dtype=float16 it must be RTN on the fp16-rounded scale,
    # so that the codes FairLinear stores with an fp16 scale dequantize to what GPTQ intended
    torch.manual_seed(0)
    W = torch.randn(16, 64) * 3
    for dtype in (torch.float16, torch.bfloat16):
        for group_size in (-1, 16):
            codes, scale = gptq_quantize(W.clone(), torch.eye(64), 4, group_size, scale_dtype=dtype)
            stored = weight_scale(W, 4, group_size).to(dtype)
            assert torch.equal(scale.to(dtype), stored)
            assert torch.equal(codes, quantize_weight(W, stored, 4, group_size))
    fp32_codes, _ = gptq_quantize(W.clone(), torch.eye(64), 4, -1)
    assert torch.equal(fp32_codes, quantize_weight(W, weight_scale(W, 4), 4))
