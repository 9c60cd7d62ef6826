"""`FairLinear`: a linear layer stored as packed low-bit weight codes with per-token activation quantization.

Forward (x: (..., in_features)):
    x <- x / input_scale                       (optional per-channel smoothing, FlatQuant/SmoothQuant)
    x <- x @ (A kron B)                        (optional Kronecker-factored transform: Hadamard or learned)
    x <- fake_quant_act(x, a_bits, act_clip)    (per-token, symmetric; skipped at a_bits = 16)
    y  = F.linear(x, codes * weight_scale, bias)
The stored codes quantize the *transformed* weight W diag(input_scale) (A kron B)^-T, so in floating
point the transform cancels exactly and only the rounding changes the output.

Persistent buffers (what a checkpoint holds): `weight`, the codes as a flat 1-D buffer (int4: uint8,
two codes a byte, each row padded to ceil(in/2) bytes; int8: int8, out * in), `weight_scale`
(out, n_groups) in the model's float dtype (float32 for K-quant grids, whose scales are fp16 x integer
products), `bias`, and when present `weight_min` (out, n_groups) (an asymmetric grid: the weight is
scale * (code + 2^(b-1)) - min, as llama.cpp's Q4_K / Q5_K), `transform_a` (n1, n1), `transform_b`
(n2, n2), `input_scale` (in,), `act_clip` (). Codes of 5 or 6 bits are stored one per int8, as 8-bit ones.

Kernels (`nn.kernels`): a layer starts on the `reference` path above, which is what calibration
computes. `set_kernel("auto")` (or `optimum_fair.use_kernels(model)`, which from_pretrained and
quantize call) moves it to an integer kernel where the device and format allow: the matmul runs on
int8 codes (A8 / A4) or through torch's int4 weight-only kernel (W4A16), and the weight is resident in
that kernel's format instead of the checkpoint's; `state_dict()` still returns the checkpoint format.

The packed codes are stored under the name `weight` on purpose, and flat: if the checkpoint is opened
without `import optimum_fair` (so transformers does not know `fair_calib` and builds float linears),
every `weight` has the wrong shape and `from_pretrained` stops with a size-mismatch error instead of
silently returning a model with random or raw-code weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..enums import WeightGrid
from ..grids import BlockGrid, values
from ..ops import (
    dequantize_weight,
    fake_quant_act,
    kron_apply,
    pack_int4,
    quantize_weight,
    unpack_int4,
    weight_scale,
)
from .kernels import (
    INT4_WEIGHT,
    INT8_MM,
    REFERENCE,
    choose,
    int4_linear,
    int4_pack,
    int4_unpack,
    int8_mm_linear,
    quantized_input,
)

__all__ = ["FairLinear", "float_weights_kept", "kron_apply"]


class FairLinear(nn.Module):
    """Packed low-bit linear. Build it with `from_linear` / `from_codes`, or empty (for loading)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        w_bits: int = 4,
        a_bits: int = 4,
        group_size: int = -1,
        kron_dims: tuple[int, int] | None = None,
        smooth: bool = False,
        act_clip: bool = False,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
        grid: BlockGrid | None = None,
        scale_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if w_bits not in (4, 5, 6, 8):
            raise ValueError(f"w_bits must be 4, 5, 6 or 8, got {w_bits}")
        if group_size != -1 and (group_size <= 0 or in_features % group_size):
            raise ValueError(f"group_size {group_size} must be -1 or divide in_features {in_features}")
        if kron_dims is not None and kron_dims[0] * kron_dims[1] != in_features:
            raise ValueError(f"kron_dims {kron_dims} must multiply to in_features {in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.w_bits, self.a_bits, self.group_size = w_bits, a_bits, group_size
        n_groups = 1 if group_size == -1 else in_features // group_size
        row_bytes = (in_features + 1) // 2 if w_bits == 4 else in_features
        code_dtype = torch.uint8 if w_bits == 4 else torch.int8
        self.register_buffer("weight", torch.zeros(out_features * row_bytes, dtype=code_dtype, device=device))
        scales = dict(dtype=scale_dtype or dtype, device=device)
        self.register_buffer("weight_scale", torch.ones(out_features, n_groups, **scales))
        self.grid = grid  # the grid of mins / two-level scales (`optimum_fair.grids`), None: symmetric codes
        asymmetric = grid is not None and grid.asymmetric
        self.register_buffer("weight_min", torch.zeros(out_features, n_groups, **scales) if asymmetric else None)
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self.register_buffer("transform_a", _eye(kron_dims[0], device) if kron_dims else None)
        self.register_buffer("transform_b", _eye(kron_dims[1], device) if kron_dims else None)
        self.register_buffer("input_scale", torch.ones(in_features, device=device) if smooth else None)
        self.register_buffer("act_clip", torch.ones((), device=device) if act_clip else None)
        # the active kernel's resident weight, when it is not the checkpoint's `weight` (nn.kernels)
        self.kernel, self.kernel_packed, self.kernel_device, self._kernel_group = REFERENCE, False, None, 0
        self.shared_input = None  # a kernels.SharedInput when siblings read the same input (use_kernels)
        self.float_weight = None  # the reference path's dequantized weight, inside `float_weights_kept`
        self.register_buffer("_kernel_weight", None, persistent=False)
        self.register_buffer("_kernel_sz", None, persistent=False)
        self.register_state_dict_post_hook(_checkpoint_weight_into_state_dict)
        self.register_load_state_dict_pre_hook(_back_to_checkpoint_format)

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor | None,
        w_bits: int,
        a_bits: int,
        group_size: int = -1,
        transform_a: torch.Tensor | None = None,
        transform_b: torch.Tensor | None = None,
        input_scale: torch.Tensor | None = None,
        act_clip: torch.Tensor | float | None = None,
        dtype: torch.dtype = torch.float16,
        mins: torch.Tensor | None = None,
        scale_dtype: torch.dtype | None = None,
        grid: BlockGrid | None = None,
    ) -> FairLinear:
        """Pack integer `codes` (out, in) with `scale` (out, n_groups), the grid they are in (None: symmetric;
        an asymmetric one needs per-group `mins`) and optional transform parts; scales stored in
        `scale_dtype` (default `dtype`)."""
        if (mins is not None) != (grid is not None and grid.asymmetric):
            raise ValueError("per-group mins go with an asymmetric grid, and only with one")
        out_f, in_f = codes.shape
        kron = (transform_a.shape[0], transform_b.shape[0]) if transform_a is not None else None
        layer = cls(in_f, out_f, bias is not None, w_bits, a_bits, group_size, kron_dims=kron,
                    smooth=input_scale is not None, act_clip=act_clip is not None, dtype=dtype,
                    device=codes.device, grid=grid, scale_dtype=scale_dtype)
        packed = pack_int4(codes) if w_bits == 4 else codes.to(torch.int8)  # (out, row_bytes)
        layer.weight.copy_(packed.reshape(-1))
        layer.weight_scale.copy_(scale)
        if mins is not None:
            layer.weight_min.copy_(mins)
        if bias is not None:
            layer.bias.copy_(bias)
        if transform_a is not None:
            layer.transform_a.copy_(transform_a)
            layer.transform_b.copy_(transform_b)
        if input_scale is not None:
            layer.input_scale.copy_(input_scale)
        if act_clip is not None:
            layer.act_clip.fill_(float(act_clip))
        return layer

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, w_bits: int = 4, a_bits: int = 4, group_size: int = -1,
        grid: WeightGrid = WeightGrid.FULL, scale_dtype: torch.dtype | None = None,
    ) -> FairLinear:
        """Round-to-nearest quantization of a plain `nn.Linear` (no transform) on `grid` (`ops.grid_top`).

        The scales are rounded to `scale_dtype` (default: the weight's dtype) and stored in the weight's."""
        w = linear.weight.detach()
        stored = w.dtype if w.dtype.is_floating_point else torch.float16
        rounded = scale_dtype or stored
        scale = weight_scale(w, w_bits, group_size, grid=grid, scale_dtype=rounded)  # (out, n_groups) float32
        # Round the scale to its dtype first, so codes are computed on the grid actually stored.
        scale = scale.to(rounded).to(stored)
        codes = quantize_weight(w, scale, w_bits, group_size)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls.from_codes(codes, scale, bias, w_bits, a_bits, group_size, dtype=stored)

    # -- use --------------------------------------------------------------------------------
    def codes(self) -> torch.Tensor:
        """Integer weight codes (out, in), int8, whichever format the weight is resident in."""
        if self.weight is not None:
            rows = self.weight.reshape(self.out_features, -1)  # (out, row_bytes)
            return unpack_int4(rows, self.in_features) if self.w_bits == 4 else rows
        if self.kernel == INT8_MM:
            return self._kernel_weight.t()  # resident (in, out)
        return int4_unpack(self._kernel_weight, self.out_features, self.in_features)

    def checkpoint_weight(self) -> torch.Tensor:
        """The flat `weight` buffer a checkpoint holds (int4: packed uint8 bytes; int8: codes)."""
        if self.weight is not None:
            return self.weight
        codes = self.codes()
        return (pack_int4(codes) if self.w_bits == 4 else codes.contiguous()).reshape(-1)

    def dequantized_weight(self) -> torch.Tensor:
        """codes * scale in the scale's dtype (on a block grid, `grids.values`: levels and mins): (out, in)."""
        if self.grid is not None:
            return values(self.grid, self.codes(), self.weight_scale, self.weight_min).to(self.weight_scale.dtype)
        w = dequantize_weight(self.codes(), self.weight_scale, self.group_size)
        return w.to(self.weight_scale.dtype)

    def _apply(self, fn, recurse=True):
        """Moves and casts as any module, except that a grid's scales and mins stay float32 (fp16 x integer
        products that a cast to the model's fp16 / bf16 would round, and the GGUF file could not hold)."""
        kept = {n: getattr(self, n) for n in ("weight_scale", "weight_min")
                if self.grid is not None and getattr(self, n) is not None}
        super()._apply(fn, recurse)
        for name, before in kept.items():
            after = getattr(self, name)
            if after.dtype != torch.float32:
                setattr(self, name, before.to(device=after.device))
        return self

    def set_kernel(self, kernel: str = "auto", packed: bool = False) -> str | None:
        """Compute with `kernel` ("auto", "reference", "int8_mm", "int4_weight") from now on.

        packed: int8_mm on int4 weights unpacks the checkpoint bytes on every call (0.25x the fp16
        bytes resident) instead of keeping int8 codes (0.5x, faster). Returns why the layer stays on
        the reference path although an integer kernel was asked for, else None.
        """
        self.shared_input = None
        if self.weight is None:  # back to the checkpoint format first
            self.weight = self.checkpoint_weight()
            self._kernel_weight = self._kernel_sz = None
        device = self.weight.device
        self.kernel, reason = choose(self.w_bits, self.a_bits, self.in_features, self.out_features,
                                     self.group_size, device, self.weight_scale.dtype, kernel, grid=self.grid)
        self.kernel_packed = packed and self.kernel == INT8_MM and self.w_bits == 4
        self.kernel_device = None if self.kernel == REFERENCE else device.type
        if self.kernel == INT8_MM and not self.kernel_packed:
            self._kernel_weight = self.codes().t().contiguous()  # (in, out) int8: _int_mm's fast operand
            self.weight = None
        elif self.kernel == INT4_WEIGHT:
            self._kernel_weight, self._kernel_sz, self._kernel_group = int4_pack(
                self.codes(), self.weight_scale, self.group_size, self.weight_min)
            self.weight = None
        return reason

    def transformed_input(self, x: torch.Tensor) -> torch.Tensor:
        """Smoothing and the Kronecker transform, before activation quantization; x: (..., in)."""
        if self.input_scale is not None:
            x = x / self.input_scale.to(x.dtype)
        if self.transform_a is not None:
            x = kron_apply(x, self.transform_a, self.transform_b)
        return x

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        """Smoothing, Kronecker transform and activation quantization; x: (..., in)."""
        return fake_quant_act(self.transformed_input(x), self.a_bits, self._clip())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., in) -> (..., out)
        if self.kernel == REFERENCE:
            w = (self.float_weight if self.float_weight is not None else self.dequantized_weight()).to(x.dtype)
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(self.transform_input(x), w, bias)
        if x.device.type != self.kernel_device:
            raise RuntimeError(f"this FairLinear's {self.kernel} weight was prepared on {self.kernel_device}, the "
                               f"input is on {x.device.type}: call optimum_fair.use_kernels(model) after moving it")
        if self.kernel == INT8_MM:
            if self.shared_input is not None and not torch.is_grad_enabled():
                codes, s_x = self.shared_input.get(x, self._quantized_input)
            else:
                codes, s_x = self._quantized_input(x)  # (M, in) int8, (M, 1)
            w_t = self._kernel_weight if self._kernel_weight is not None else self.codes().t()  # (in, out)
            return int8_mm_linear(codes, s_x, w_t, self.weight_scale, self.bias, x.shape[:-1], x.dtype)
        x = self.transformed_input(x)
        return int4_linear(x, self._kernel_weight, self._kernel_sz, self._kernel_group, self.bias)

    def _quantized_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return quantized_input(self.transformed_input(x), self.a_bits, self._clip())

    @property
    def has_online_transform(self) -> bool:
        """Whether the input is smoothed or Kronecker-transformed before quantization (no export holds that)."""
        return self.transform_a is not None or self.input_scale is not None

    def same_input_transform(self, other: FairLinear) -> bool:
        """Whether `other` turns the same input into the same activation codes as this layer."""
        mine, theirs = (self.input_scale, self.transform_a, self.transform_b, self.act_clip), \
            (other.input_scale, other.transform_a, other.transform_b, other.act_clip)
        return self.in_features == other.in_features and self.a_bits == other.a_bits and all(
            (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
            for a, b in zip(mine, theirs, strict=True))

    def _clip(self) -> torch.Tensor | float:
        return 1.0 if self.act_clip is None else self.act_clip.float()

    def extra_repr(self) -> str:
        parts = [f"in_features={self.in_features}", f"out_features={self.out_features}",
                 f"w_bits={self.w_bits}", f"a_bits={self.a_bits}", f"group_size={self.group_size}"]
        if self.grid is not None:
            parts.append(f"grid={self.grid.gguf_type.value if self.grid.gguf_type else 'asymmetric'}")
        if self.transform_a is not None:
            parts.append(f"kron=({self.transform_a.shape[0]}, {self.transform_b.shape[0]})")
        parts.append(f"kernel={self.kernel}" + (" (packed)" if self.kernel_packed else ""))
        return ", ".join(parts)


def _checkpoint_weight_into_state_dict(module: FairLinear, state_dict, prefix: str, local_metadata) -> None:
    """state_dict() holds the checkpoint's `weight` whatever format the kernel keeps resident."""
    if module.weight is None:
        state_dict[prefix + "weight"] = module.checkpoint_weight()


def _back_to_checkpoint_format(module: FairLinear, state_dict, prefix, *args) -> None:
    """load_state_dict() writes checkpoint tensors: the layer takes that format (and the reference
    kernel) first; call set_kernel / use_kernels again afterwards."""
    if module.kernel != REFERENCE:
        module.set_kernel(REFERENCE)


def _eye(n: int, device) -> torch.Tensor:
    return torch.eye(n, device=device)


@contextlib.contextmanager
def float_weights_kept(module: nn.Module) -> Iterator[None]:
    """Inside, every FairLinear of `module` on the reference path dequantizes its weight once, not on every
    call (calibration runs a block over many batches); the float copies are dropped on exit."""
    layers = [m for m in module.modules() if isinstance(m, FairLinear) and m.kernel == REFERENCE]
    try:
        for m in layers:
            m.float_weight = m.dequantized_weight()
        yield
    finally:
        for m in layers:
            m.float_weight = None
