"""Inference speed of packed layers on their integer kernels against nn.Linear, every side in one process.

    python benchmarks/inference_speed.py                      # all parts, the machine's threads
    python benchmarks/inference_speed.py --threads 1 --parts layers --out /tmp/speed.json

Parts (each side on the same inputs):
  layers   single layers at LLaDA-8B shapes (4096 -> 4096, 4096 -> 12288, 12288 -> 4096), M = 32 and 256
           tokens: nn.Linear fp32 and bf16, then W8A8 / W4A8 / W4A4 (int8_mm; W4A4 also `packed`, the
           int4 bytes unpacked per call, and with an online Kronecker transform as Hadamard / FlatQuant
           layers have one), W4A16 (int4_weight) and W4A4 on the reference path, all bf16;
  block    one LLaDA-8B-shaped block (a 1-layer native LLaDA, d_model 4096, 32 heads, MLP 12288, vocab
           128, random weights, 256 tokens), float vs its linears swapped for round-to-nearest FairLinears;
  shipped  the shipped model: one forward of 128 tokens and a full 64-token diffusion decode (block 32,
           64 steps), fp32 / bf16 teacher vs quantized (RTN + Hadamard, uniform weighting); W4A4 also
           saved and reloaded from its checkpoint, as a user runs it.
Prints a markdown table: ms per call (median; the sides of a case are timed round-robin), the ratio
to bf16 and to fp32 nn.Linear (or teacher) of
the same part, and the weight bytes resident per fp16 weight byte.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from machine import machine
from torch import nn

LAYER_SHAPES = [(4096, 4096), (4096, 12288), (12288, 4096)]
FORMATS = {"W8A8": (8, 8), "W4A8": (4, 8), "W4A4": (4, 4), "W4A16": (4, 16)}


def interleaved_ms(calls: dict, repeats: int) -> dict[str, float]:
    """Median ms per call of each side, timed round-robin (every side once per round), so that drift
    in the machine's speed hits all sides alike. One warm-up round first."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for round_ in range(repeats + 1):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            if round_:
                times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights as resident: float linear weights, or FairLinear codes, scales and kernel data."""
    from optimum_fair.nn import FairLinear

    total = 0
    for module in model.modules():
        if isinstance(module, FairLinear):
            total += sum(b.numel() * b.element_size() for n, b in module.named_buffers(recurse=False) if n != "bias")
        elif isinstance(module, nn.Linear):
            total += module.weight.numel() * module.weight.element_size()
    return total


def fair_copy(linear: nn.Linear, w_bits: int, a_bits: int, kernel: str, packed: bool = False):
    from optimum_fair.nn import FairLinear

    layer = FairLinear.from_linear(linear, w_bits, a_bits)
    reason = layer.set_kernel(kernel, packed=packed)
    if reason:
        raise RuntimeError(f"W{w_bits}A{a_bits} {kernel}: {reason}")
    return layer


def with_kron(linear: nn.Linear, w_bits: int, a_bits: int):
    """An RTN FairLinear with an online Kronecker transform (random orthogonal factors) on its kernel."""
    from optimum_fair.nn import FairLinear

    k = linear.in_features
    n1 = next(d for d in range(int(k**0.5), 0, -1) if k % d == 0)
    a, b = (torch.linalg.qr(torch.randn(d, d))[0] for d in (n1, k // n1))
    plain = FairLinear.from_linear(linear, w_bits, a_bits)
    layer = FairLinear.from_codes(plain.codes(), plain.weight_scale, None, w_bits, a_bits, transform_a=a,
                                  transform_b=b, dtype=plain.weight_scale.dtype)
    layer.set_kernel()
    return layer


def swap_linears(model: nn.Module, w_bits: int, a_bits: int) -> nn.Module:
    """A copy of `model` with every linear inside its blocks replaced by an RTN FairLinear on its kernel."""
    from optimum_fair.nn import use_kernels

    quantized = copy.deepcopy(model)
    for name, module in list(quantized.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and ".blocks." in f"{name}.":
                setattr(module, child_name, fair_copy(child, w_bits, a_bits, "reference"))
    use_kernels(quantized)
    return quantized


def row(part, case, variant, kernel, ms, base, nbytes, fp16_bytes) -> dict:
    return {"part": part, "case": case, "variant": variant, "kernel": kernel, "ms": round(ms, 2),
            "x_bf16": round(ms / base["bf16"], 3), "x_fp32": round(ms / base["fp32"], 3),
            "bytes_x_fp16": round(nbytes / fp16_bytes, 3) if fp16_bytes else None}


@torch.no_grad()
def layers_part(repeats: int) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(0)
    for k, n in LAYER_SHAPES:
        fp32 = nn.Linear(k, n, bias=False)
        bf16 = copy.deepcopy(fp32).bfloat16()
        sides = {"nn.Linear fp32": (fp32, "float"), "nn.Linear bf16": (bf16, "float")}
        for name, (w, a) in FORMATS.items():
            kernel = "int4_weight" if a == 16 else "int8_mm"
            sides[f"{name}"] = (fair_copy(bf16, w, a, kernel), kernel)
        sides["W4A4 + Kronecker"] = (with_kron(bf16, 4, 4), "int8_mm")
        sides["W4A4 packed"] = (fair_copy(bf16, 4, 4, "int8_mm", packed=True), "int8_mm")
        sides["W4A4 reference"] = (fair_copy(bf16, 4, 4, "reference"), "reference")
        for m in (32, 256):
            x32 = torch.randn(m, k, generator=gen)
            x16 = x32.bfloat16()
            inputs = {v: x32 if v.endswith("fp32") else x16 for v in sides}
            times = interleaved_ms({v: (lambda mod=mod, x=inputs[v]: mod(x)) for v, (mod, _) in sides.items()}, repeats)
            base = {"fp32": times["nn.Linear fp32"], "bf16": times["nn.Linear bf16"]}
            for v, (mod, kernel) in sides.items():
                rows.append(row("layer", f"{k}->{n}, M={m}", v, kernel, times[v], base, weight_bytes(mod), 2 * k * n))
            print(f"  layer {k}->{n} M={m} done", flush=True)
    return rows


@torch.no_grad()
def block_part(repeats: int) -> list[dict]:
    from optimum_fair.modeling import LLaDAConfig, LLaDAModelLM

    torch.manual_seed(0)
    cfg = LLaDAConfig(d_model=4096, n_heads=32, n_kv_heads=32, n_layers=1, mlp_hidden_size=12288,
                      vocab_size=128, embedding_size=128, max_sequence_length=256, mask_token_id=3,
                      weight_tying=False)
    fp32 = LLaDAModelLM(cfg).eval()
    bf16 = copy.deepcopy(fp32).bfloat16()
    ids = torch.randint(4, 128, (1, 256), generator=torch.Generator().manual_seed(1))
    sides = {"fp32": (fp32, "float"), "bf16": (bf16, "float")}
    for name, (w, a) in FORMATS.items():
        sides[name] = (swap_linears(bf16, w, a), "int4_weight" if a == 16 else "int8_mm")
    times = interleaved_ms({v: (lambda mod=mod: mod(ids)) for v, (mod, _) in sides.items()}, repeats)
    base = {"fp32": times["fp32"], "bf16": times["bf16"]}
    fp16_bytes = weight_bytes(bf16)
    return [row("block", "LLaDA-8B block, 256 tokens", v, k, times[v], base, weight_bytes(m), fp16_bytes)
            for v, (m, k) in sides.items()]


@torch.no_grad()
def shipped_part(repeats: int) -> list[dict]:
    from transformers import AutoModel, AutoTokenizer

    import optimum_fair
    from optimum_fair import FairCalibConfig
    from optimum_fair.eval.generation import generate

    path = optimum_fair.DEFAULT_MODEL
    tok = AutoTokenizer.from_pretrained(path)
    quick = dict(rounding="rtn", transform="hadamard", weighting="uniform", num_probes=8, num_samples=8)
    sides = {"teacher fp32": AutoModel.from_pretrained(path, dtype=torch.float32).eval(),
             "teacher bf16": AutoModel.from_pretrained(path, dtype=torch.bfloat16).eval()}
    for name, dtype in [("W4A4", torch.float32), ("W8A8", torch.float32), ("W4A16", torch.bfloat16)]:
        w, a = FORMATS[name]
        sides[f"{name} ({str(dtype)[6:]})"] = AutoModel.from_pretrained(
            path, dtype=dtype, quantization_config=FairCalibConfig(w_bits=w, a_bits=a, **quick)).eval()
    with tempfile.TemporaryDirectory() as saved:  # what a user runs: the checkpoint, reloaded
        sides["W4A4 (float32)"].save_pretrained(saved)
        sides["W4A4 (float32) reloaded"] = AutoModel.from_pretrained(saved, dtype=torch.float32).eval()
    sides["W4A4 (float32) reference"] = copy.deepcopy(sides["W4A4 (float32)"])
    optimum_fair.use_kernels(sides["W4A4 (float32) reference"], "reference")
    ids = torch.randint(4, 1000, (1, 128), generator=torch.Generator().manual_seed(2))
    fp16_bytes = weight_bytes(sides["teacher bf16"])
    rows = []
    for case, fn in [("forward, 128 tokens", lambda m: m(ids)),
                     ("diffusion decode, 64 tokens", lambda m: generate(m, tok, "The city of", gen_length=64,
                                                                        block_length=32))]:
        times = interleaved_ms({v: (lambda m=m, fn=fn: fn(m)) for v, m in sides.items()}, repeats)
        base = {"fp32": times["teacher fp32"], "bf16": times["teacher bf16"]}
        rows += [row("shipped", case, v, _kernels(m), times[v], base, weight_bytes(m), fp16_bytes)
                 for v, m in sides.items()]
    return rows


def _kernels(model: nn.Module) -> str:
    from optimum_fair.nn import FairLinear

    found = sorted({m.kernel for m in model.modules() if isinstance(m, FairLinear)})
    return "+".join(found) or "float"


def machine_info() -> dict:
    """benchmarks/machine.py's CPU name, cores and flags, plus torch's threads, version and CPU capability."""
    return {**machine(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def markdown(rows: list[dict]) -> str:
    lines = ["| part | case | variant | kernel | ms | x bf16 | x fp32 | weight bytes x fp16 |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['part']} | {r['case']} | {r['variant']} | {r['kernel']} | {r['ms']} | {r['x_bf16']} | "
              f"{r['x_fp32']} | {r['bytes_x_fp16']} |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--parts", nargs="+", default=["layers", "block", "shipped"],
                        choices=["layers", "block", "shipped"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="also write the rows and the machine as JSON")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info()
    print(json.dumps(info), flush=True)
    parts = {"layers": layers_part, "block": block_part, "shipped": shipped_part}
    rows = [r for p in args.parts for r in parts[p](args.repeats)]
    print(markdown(rows))
    if args.out:
        args.out.write_text(json.dumps({"machine": info, "args": vars(args) | {"out": str(args.out)},
                                        "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
