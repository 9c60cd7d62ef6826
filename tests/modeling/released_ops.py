"""Plain tensor ops of the released modeling files, shared by the re-implementations the tests compare
the native models with (written from the released code, not from ours)."""

import torch
import torch.nn.functional as F


def rms(x, w, eps):
    """The released RMSNorm: statistic in float32, cast back before the gain."""
    x32 = x.float()
    return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rotate_half(x):
    return torch.cat((-x[..., x.shape[-1] // 2:], x[..., : x.shape[-1] // 2]), dim=-1)


def mlp(sd, p, x):
    """down(silu(gate(x)) * up(x)) from the state dict under prefix p."""
    return F.silu(x @ sd[p + "gate_proj.weight"].T) * (x @ sd[p + "up_proj.weight"].T) @ sd[p + "down_proj.weight"].T
