"""The inference paths of two low-bit primitives against their previous versions, in one process.

    python benchmarks/ops_speed.py           # one thread, the shipped model's shapes

Baselines: int4 unpacking by masking the nibbles and mapping 8..15 to -8..-1 with `torch.where` (the
version before the arithmetic-shift unpack), and per-token activation fake-quant through the
straight-through formula x + (round(x) - x) out of place (the path training still takes). Each pair is
checked to give identical results before it is timed. Prints time per call and the ratio ours / baseline.
"""

from __future__ import annotations

import argparse
import time

import torch

from optimum_fair.ops import fake_quant_act, pack_int4, qmax, unpack_int4


def unpack_where(packed: torch.Tensor, n: int) -> torch.Tensor:
    lo, hi = (packed & 0xF).to(torch.int8), (packed >> 4).to(torch.int8)
    both = torch.stack((lo, hi), dim=-1).flatten(-2)[..., :n]  # (..., n) in [0, 15]
    return torch.where(both > 7, both - 16, both)


def fake_quant_ste(x: torch.Tensor, bits: int) -> torch.Tensor:
    amax = x.abs().amax(dim=-1, keepdim=True).float()  # (..., 1)
    scale = (amax / qmax(bits)).clamp(min=1e-8)
    y = x.float() / scale
    return ((y + (torch.round(y) - y)).clamp(-qmax(bits) - 1, qmax(bits)) * scale).to(x.dtype)


def per_call(fn, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=50)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(-8, 8, (1024, 256), generator=gen, dtype=torch.int8)  # the teacher's largest linear
    packed = pack_int4(codes)
    x = torch.randn(16, 128, 256, generator=gen)  # 16 sequences of 128 tokens, d_model 256
    cases = {"unpack_int4 (1024 x 256)": (lambda: unpack_int4(packed, 256), lambda: unpack_where(packed, 256)),
             "fake_quant_act A4, no grad (16 x 128 x 256)": (lambda: fake_quant_act(x, 4),
                                                             lambda: fake_quant_ste(x, 4))}
    print("| op | ours, µs | baseline, µs | ours / baseline |\n|---|---|---|---|")
    with torch.no_grad():
        for name, (ours, base) in cases.items():
            if not torch.equal(ours(), base()):
                raise AssertionError(f"{name}: ours and the baseline differ")
            t_ours, t_base = per_call(ours, args.repeats), per_call(base, args.repeats)
            print(f"| {name} | {1e6 * t_ours:.0f} | {1e6 * t_base:.0f} | {t_ours / t_base:.2f} |")


if __name__ == "__main__":
    main()
