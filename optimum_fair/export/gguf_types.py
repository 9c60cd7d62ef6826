"""GGUF tensor encodings the export writes itself, and llama.cpp's mixes: which type each tensor gets.

A file type (`--type`) names a mix, as `llama-quantize` applies it (src/llama-quant.cpp): the block
linears in the type itself, the token embedding in the same type, and the output head in Q6_K, or Q8_0
when its row width is not a multiple of 256 (Q6_K's super-block) or the type is Q8_0; one-dimensional
tensors (norms, biases) always F32. F32 / F16 / BF16 write an unquantized model (every matrix in that
type), so llama.cpp's own tools can quantize what we wrote. A quantized type needs the block linears
already calibrated in it (`FairCalibConfig(gguf_type=...)`): their codes go in as they are, and only
the embedding and the head, which calibration leaves in float, are rounded here: per block, the
least-error scale of `ops.searched_scale` (at least as good as llama.cpp's reference rounding).

Q6_K (210 bytes per 256 weights): 16 sub-blocks of 16 six-bit codes q in [-32, 31], each sub-block with
an int8 scale l, the super-block with one fp16 d; a weight is d * l * q. The codes are stored as q + 32:
the low nibbles in `ql` (128 bytes), the high two bits in `qh` (64 bytes), then the 16 scales and d.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..enums import GGUFType
from ..ops import quantize_weight, searched_scale

BLOCK = 32  # weights per Q4_0 / Q8_0 block
QK_K = 256  # weights per K-quant super-block
FLOATS = (GGUFType.F32, GGUFType.F16, GGUFType.BF16)
BITS = {GGUFType.Q4_0: 4, GGUFType.Q8_0: 8}  # block types whose codes calibration writes
FILE_TYPES = {GGUFType.F32: "ALL_F32", GGUFType.F16: "MOSTLY_F16", GGUFType.BF16: "MOSTLY_BF16",
              GGUFType.Q4_0: "MOSTLY_Q4_0", GGUFType.Q8_0: "MOSTLY_Q8_0"}  # general.file_type (LlamaFileType)


@dataclass(frozen=True)
class Mix:
    """The types of one GGUF file type: block linears, token embedding, output head (and its fallback)."""

    blocks: GGUFType
    embedding: GGUFType
    head: GGUFType
    head_fallback: GGUFType  # when the head's row width is not a multiple of QK_K

    def head_type(self, width: int) -> GGUFType:
        return self.head if width % QK_K == 0 else self.head_fallback


MIXES = {t: Mix(t, t, t, t) for t in FLOATS} | {
    GGUFType.Q4_0: Mix(GGUFType.Q4_0, GGUFType.Q4_0, GGUFType.Q6_K, GGUFType.Q8_0),
    GGUFType.Q8_0: Mix(GGUFType.Q8_0, GGUFType.Q8_0, GGUFType.Q8_0, GGUFType.Q8_0),
}


def mix_for(gguf_type: GGUFType | str) -> Mix:
    """The mix of a file type; ValueError listing the supported ones."""
    try:
        return MIXES[GGUFType(gguf_type)]
    except (ValueError, KeyError):
        raise ValueError(f"gguf_type must be one of {[t.value for t in MIXES]}, got {gguf_type!r}") from None


def encode(w: torch.Tensor, qtype: GGUFType) -> tuple[np.ndarray, str | None]:
    """The bytes of a float matrix w (N, K) in `qtype`, and the raw type name to write them with (None: the
    array's own dtype, F32 or F16)."""
    w = w.detach().float()
    if qtype is GGUFType.F32:
        return w.numpy(), None
    if qtype is GGUFType.F16:
        return w.half().numpy(), None
    if qtype is GGUFType.BF16:
        return w.bfloat16().view(torch.int16).numpy().view(np.uint8), "BF16"
    if qtype in BITS:
        codes, scale = _block_codes(w, qtype)
        return q_blocks(codes, scale, BLOCK, BITS[qtype]), qtype.value
    if qtype is GGUFType.Q6_K:
        return q6_k_blocks(w), "Q6_K"
    raise ValueError(f"cannot write a float tensor as {qtype.value}")


def rounded(w: torch.Tensor, qtype: GGUFType) -> torch.Tensor:
    """w (N, K) float as a `qtype` block type (Q4_0 / Q8_0) stores it: codes x fp16 scales, float32. `encode`
    writes these values back exactly (their own scale is among its candidates, with zero error)."""
    codes, scale = _block_codes(w.detach().float(), qtype)
    return codes.float() * scale.repeat_interleave(BLOCK, dim=1)


def _block_codes(w: torch.Tensor, qtype: GGUFType) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (N, K) int8 and searched fp16-exact scales (N, K / 32) of w (N, K) float32 in Q4_0 / Q8_0."""
    scale = searched_scale(w, BITS[qtype], BLOCK, scale_dtype=torch.float16)  # (N, K / 32)
    return quantize_weight(w, scale, BITS[qtype], BLOCK), scale


def q_blocks(codes: torch.Tensor, scale: torch.Tensor, group_size: int, w_bits: int) -> np.ndarray:
    """Q4_0 / Q8_0 bytes of codes (N, K) int8 with scale (N, n_groups): (N, K / 32 * block bytes) uint8."""
    n, k = codes.shape
    d = scale.float().repeat_interleave((k if group_size == -1 else group_size) // BLOCK, dim=1)  # (N, K/32)
    d = d.to(torch.float16).numpy().view(np.uint8).reshape(n, k // BLOCK, 2)  # little-endian fp16 bytes
    c = codes.reshape(n, k // BLOCK, BLOCK)
    if w_bits == 4:
        q = (c.to(torch.int16) + 8).to(torch.uint8)  # [0, 15]
        qs = q[..., :16] | (q[..., 16:] << 4)  # element j low nibble, j + 16 high nibble
    else:
        qs = c.view(torch.uint8)
    return np.concatenate([d, qs.numpy()], axis=-1).reshape(n, -1)


def q6_k_blocks(w: torch.Tensor) -> np.ndarray:
    """Q6_K bytes of w (N, K), K a multiple of 256: (N, K / 256 * 210) uint8."""
    n, k = w.shape
    if k % QK_K:
        raise ValueError(f"Q6_K needs rows of a multiple of {QK_K} weights, got {k}")
    sub = searched_scale(w.float(), 6, 16)  # (N, K / 16): each sub-block's own best scale
    sub = sub.reshape(n, k // QK_K, 16)  # (N, S, 16)
    m = sub.gather(-1, sub.abs().argmax(-1, keepdim=True))  # (N, S, 1): the signed largest
    d = (m / -128).half()  # (N, S, 1): the largest sub-scale becomes l = -128
    d = torch.where(d == 0, torch.ones_like(d), d)  # an all-zero super-block: any d, its l are 0
    levels = torch.round(sub / d.float()).clamp(-128, 127)  # (N, S, 16)
    step = (d.float() * levels).repeat_interleave(16, dim=-1)  # (N, S, 256): d * l per weight
    x = w.float().reshape(n, k // QK_K, QK_K)
    q = torch.where(step != 0, torch.round(x / step), torch.zeros_like(x)).clamp(-32, 31)  # (N, S, 256)
    return _pack_q6_k(q.to(torch.int16) + 32, levels.to(torch.int8), d).reshape(n, -1)


def _pack_q6_k(q: torch.Tensor, levels: torch.Tensor, d: torch.Tensor) -> np.ndarray:
    """q (N, S, 256) in [0, 63], levels (N, S, 16) int8, d (N, S, 1) fp16 -> (N, S, 210) uint8.

    Each half of 128 codes is four quarters a, b, c, e of 32: ql holds a | c << 4 then b | e << 4 (low
    nibbles), qh holds the high two bits of a, b, c, e at bits 0, 2, 4, 6."""
    n, s, _ = q.shape
    quarters = q.reshape(n, s, 2, 4, 32)  # (N, S, half, quarter, 32)
    low, high = quarters & 0xF, quarters >> 4
    pair = (low[:, :, :, 0] | low[:, :, :, 2] << 4, low[:, :, :, 1] | low[:, :, :, 3] << 4)  # 2 x (N, S, half, 32)
    ql = torch.stack(pair, 3)  # (N, S, half, 2, 32)
    qh = high[:, :, :, 0] | high[:, :, :, 1] << 2 | high[:, :, :, 2] << 4 | high[:, :, :, 3] << 6  # (N, S, 2, 32)
    parts = (ql.reshape(n, s, 128).to(torch.uint8).numpy(), qh.reshape(n, s, 64).to(torch.uint8).numpy(),
             levels.numpy().view(np.uint8), d.numpy().view(np.uint8).reshape(n, s, 2))
    return np.concatenate(parts, axis=-1)
