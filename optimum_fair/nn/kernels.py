"""Integer kernels behind `FairLinear`: which one a layer can use, its resident weight, its matmul.

* `int8_mm` (A8 / A4 activations, per-channel weight scales): per-token activation codes in int8,
  `torch._int_mm` (int8 x int8 -> int32, exact), then the token and channel scales applied once to
  the output. The weight is resident as int8 codes (K, N), or, `packed=True`, as the checkpoint's int4
  bytes unpacked on every call (a quarter of the fp16 bytes instead of half, slower).
* `int4_weight` (W4A16, CPU): torch's int4 weight-only matmul (`_weight_int4pack_mm_for_cpu`) in
  bfloat16. Symmetric codes c in [-8, 7] are its unsigned codes c + 8 with a float zero of 0. It is
  fast only in bfloat16 (float32 inputs take ~70x longer here), so "auto" picks it for bfloat16
  layers only: on a float32 model it would round activations and scales to 8 significant bits, which
  changes greedy decodes; ask for it by name to accept that.
* `reference`: the fake-quant path (dequantize the weight, float matmul), what calibration computes.

`choose` names the kernel a layer gets and, when it is `reference` although a faster one was asked
for, the reason.
"""

from __future__ import annotations

import weakref

import torch

from ..grids import BlockGrid
from ..ops import quantize_act

REFERENCE, INT8_MM, INT4_WEIGHT = "reference", "int8_mm", "int4_weight"
KERNELS = ("auto", REFERENCE, INT8_MM, INT4_WEIGHT)
INT4_GROUP_SIZES = (256, 128, 64, 32)  # what _weight_int4pack_mm_for_cpu takes, largest first
_CUDA_INT_MM_MIN_ROWS = 17  # torch._int_mm on CUDA needs M > 16 and K, N multiples of 8


def choose(w_bits: int, a_bits: int, in_features: int, out_features: int, group_size: int,
           device: torch.device, dtype: torch.dtype, kernel: str = "auto", grid: BlockGrid | None = None
           ) -> tuple[str, str | None]:
    """(kernel, reason): the kernel for a layer of this format (`grid`: the layer's block grid, if any), on
    `device`, computing in `dtype`; reason says why a requested (or, for "auto", any) integer kernel cannot
    run, else None."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel == REFERENCE:
        return REFERENCE, None
    if grid is not None and grid.table:
        return REFERENCE, f"{kernel}: codes index a codebook ({grid.gguf_type.value}): the reference path computes it"
    wanted = kernel if kernel != "auto" else (INT4_WEIGHT if a_bits >= 16 else INT8_MM)
    if wanted == INT8_MM and grid is not None and grid.asymmetric:
        return REFERENCE, f"{wanted}: per-group mins cannot be applied after an integer matmul"
    if wanted == INT8_MM:
        reason = _int8_mm_unsupported(a_bits, in_features, out_features, group_size, device)
    else:
        reason = _int4_weight_unsupported(w_bits, a_bits, in_features, out_features, group_size, device)
        if not reason and kernel == "auto" and dtype != torch.bfloat16:
            reason = (f"computes in bfloat16, the layer in {str(dtype).removeprefix('torch.')} (load the model "
                      "with dtype=torch.bfloat16, or ask for kernel='int4_weight')")
    return (REFERENCE, f"{wanted}: {reason}") if reason else (wanted, None)


def _int8_mm_unsupported(a_bits, in_features, out_features, group_size, device) -> str | None:
    if a_bits > 8:
        return f"needs quantized activations (a_bits <= 8), got a_bits={a_bits}"
    if group_size != -1:
        return f"group-wise weight scales (group_size={group_size}) cannot be applied after an integer matmul"
    if device.type == "cuda" and (in_features % 8 or out_features % 8):
        return f"CUDA torch._int_mm needs in and out features divisible by 8, got {in_features} -> {out_features}"
    if device.type not in ("cpu", "cuda"):
        return f"torch._int_mm does not run on {device.type}"
    return None


def _int4_weight_unsupported(w_bits, a_bits, in_features, out_features, group_size, device) -> str | None:
    if w_bits != 4 or a_bits < 16:
        return f"is the weight-only int4 kernel (W4A16), the layer is W{w_bits}A{a_bits}"
    if device.type != "cpu":
        return f"only the CPU int4 kernel is wired up, the layer is on {device.type}"
    if out_features % 16:
        return f"needs out_features divisible by 16, got {out_features}"
    if int4_group_size(in_features if group_size == -1 else group_size) is None:
        return f"needs the scale group ({group_size}, in_features {in_features}) divisible by 32"
    return None


def int4_group_size(group: int) -> int | None:
    """The largest group size the int4 kernel takes that divides `group` (None if none does)."""
    return next((g for g in INT4_GROUP_SIZES if group % g == 0), None)


# -- int8_mm ---------------------------------------------------------------------------------------
def quantized_input(x: torch.Tensor, a_bits: int, clip: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token codes of transformed activations x (..., K): (M, K) int8 and their scales (M, 1) float32."""
    return quantize_act(x.reshape(-1, x.shape[-1]), a_bits, clip)


def int8_mm_linear(codes: torch.Tensor, s_x: torch.Tensor, w_codes_t: torch.Tensor, w_scale: torch.Tensor,
                   bias: torch.Tensor | None, lead: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """y = (codes_x @ codes_w^T) * s_x * s_w + bias, the matmul in integers.

    codes: (M, K) int8 and s_x: (M, 1) from `quantized_input`; w_codes_t: (K, N) int8 (a transposed
    view is fine); w_scale: (N, 1); returns (*lead, N) in `dtype`.
    """
    acc = int_mm(codes, w_codes_t)  # (M, N) int32, exact
    y = acc.float().mul_(s_x).mul_(w_scale.float().reshape(1, -1)).to(dtype)  # (M, N)
    if bias is not None:
        y = y.add_(bias.to(dtype))
    return y.reshape(*lead, y.shape[-1])


class SharedInput:
    """The quantized input of sibling layers that read the same tensor (q / k / v, gate / up) with the
    same input transform: the first computes it, the others reuse it while the input is the same tensor
    object, unchanged (`Tensor._version`, torch's in-place counter). The input is held by weak reference."""

    def __init__(self) -> None:
        self._source: weakref.ref | None = None
        self._version = -1
        self._value: tuple[torch.Tensor, torch.Tensor] | None = None

    def get(self, x: torch.Tensor, compute) -> tuple[torch.Tensor, torch.Tensor]:
        if x.is_inference():  # inference-mode tensors have no version counter: in-place edits are invisible
            return compute(x)
        if self._source is not None and self._source() is x and x._version == self._version:
            return self._value
        self._value = compute(x)
        self._source, self._version = weakref.ref(x), x._version
        return self._value


def int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torch._int_mm, with the rows padded where CUDA needs more than 16. a: (M, K); b: (K, N)."""
    m = a.shape[0]
    if a.is_cuda and m < _CUDA_INT_MM_MIN_ROWS:
        a = torch.nn.functional.pad(a, (0, 0, 0, _CUDA_INT_MM_MIN_ROWS - m))
        return torch._int_mm(a, b)[:m]
    return torch._int_mm(a, b)


# -- int4_weight -----------------------------------------------------------------------------------
def int4_pack(codes: torch.Tensor, scale: torch.Tensor, group_size: int, mins: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(packed, scales_and_zeros, kernel_group): the int4 kernel's operands for codes * scale, or for
    scale * (codes + 8) - mins on an asymmetric grid (the kernel's zero is then 8 scale - min).

    codes: (N, K) int8 in [-8, 7]; scale, mins: (N, n_groups). A per-channel scale (group_size -1) or a
    group larger than the kernel takes is repeated over kernel groups, which is the same weight.
    """
    k = codes.shape[1]
    kernel_group = int4_group_size(k if group_size == -1 else group_size)
    packed = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32) + 8, 1)
    repeat = k // kernel_group // scale.shape[1]
    per_group = scale.float().repeat_interleave(repeat, dim=1)  # (N, K / g)
    zeros = torch.zeros_like(per_group) if mins is None else 8 * per_group - mins.float().repeat_interleave(repeat, 1)
    sz = torch.stack((per_group.t(), zeros.t()), dim=-1)  # (K / g, N, 2)
    return packed, sz.to(torch.bfloat16).contiguous(), kernel_group


def int4_linear(x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor, kernel_group: int,
                bias: torch.Tensor | None) -> torch.Tensor:
    """x @ (codes * scale)^T + bias with the CPU int4 kernel, computed in bfloat16; x: (..., K)."""
    lead, k = x.shape[:-1], x.shape[-1]
    y = torch._weight_int4pack_mm_for_cpu(x.reshape(-1, k).to(torch.bfloat16), packed, kernel_group, sz)
    y = y.to(x.dtype)  # (M, N)
    if bias is not None:
        y = y.add_(bias.to(x.dtype))
    return y.reshape(*lead, y.shape[-1])


def int4_unpack(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """The codes (N, K) int8 held in the int4 kernel's layout, without relying on what that layout is.

    The conversion only moves nibbles, so converting the hexadecimal digits of every element's flat
    index with the same function shows, at each packed nibble, which element it came from.
    """
    n, k = out_features, in_features
    index = torch.arange(n * k, dtype=torch.int64, device=packed.device)
    source = torch.zeros(n * k, dtype=torch.int64, device=packed.device)  # source element of each nibble
    for digit in range(max(1, ((n * k - 1).bit_length() + 3) // 4)):
        hex_digit = ((index >> (4 * digit)) & 0xF).to(torch.int32).reshape(n, k)
        source |= _nibbles(torch._convert_weight_to_int4pack_for_cpu(hex_digit, 1)) << (4 * digit)
    codes = torch.empty(n * k, dtype=torch.int8, device=packed.device)
    codes[source] = (_nibbles(packed) - 8).to(torch.int8)
    return codes.reshape(n, k)


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Every nibble of a uint8 tensor, low then high of each byte: (...,) -> (2 * numel,) int64."""
    b = packed.reshape(-1).to(torch.int64)
    return torch.stack((b & 0xF, b >> 4), dim=-1).reshape(-1)
