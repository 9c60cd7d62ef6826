"""The one tensor digest (checkpoint metadata, resume-cache fingerprints)."""

import torch

from optimum_fair.digests import tensor_digest


def test_digest_sees_dtype_shape_and_bytes():
    t = torch.arange(6, dtype=torch.int32)
    assert tensor_digest(t) == tensor_digest(t.clone()) and len(tensor_digest(t)) == 16
    assert tensor_digest(t) != tensor_digest(t.reshape(2, 3))  # same bytes, other shape
    assert tensor_digest(t) != tensor_digest(t.view(torch.float32))  # same bytes, other dtype
    flipped = t.clone()
    flipped[3] += 1
    assert tensor_digest(t) != tensor_digest(flipped)


def test_digest_takes_every_dtype_and_views():
    x = torch.randn(4, 8)
    assert tensor_digest(x.bfloat16()) != tensor_digest(x.half())  # numpy has no bfloat16: hashed as bytes
    assert tensor_digest(x.t()) == tensor_digest(x.t().contiguous())  # a strided view: its values, in order
    assert tensor_digest(x.requires_grad_()) == tensor_digest(x.detach())
