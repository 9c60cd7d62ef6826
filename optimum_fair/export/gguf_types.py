"""GGUF tensor encodings the export writes itself, and llama.cpp's mixes: which type each tensor gets.

A file type (`--type`) names a mix, as `llama-quantize` applies it (src/llama-quant.cpp): the block
linears in the type itself, the token embedding in the same type, and the output head in Q6_K, or Q8_0
when its row width is not a multiple of 256 (Q6_K's super-block) or the type is Q8_0; one-dimensional
tensors (norms, biases) always F32. F32 / F16 / BF16 write an unquantized model (every matrix in that
type), so llama.cpp's own tools can quantize what we wrote. A quantized type needs the block linears
already calibrated in it (`FairCalibConfig(gguf_type=...)`): their codes go in as they are, and only
the embedding and the head, which calibration leaves in float, are rounded here: per block, the
least-error scale of `ops.searched_scale` (at least as good as llama.cpp's reference rounding).

A calibrated layer's type follows from what it stores (`layer_type`): per-32 fp16 scales and 4 / 5 / 8-bit
codes are Q4_0 / Q5_0 / Q8_0; per-group mins make Q4_K / Q5_K; 6-bit codes in groups of 16 Q6_K (the
K-quant grids of `optimum_fair.grids`, whose scales are written back as fp16 x integer exactly).

Byte layouts (ggml-quants.c; each checked against the gguf package's dequantizer in the tests):
* Q5_0 (22 bytes per 32): fp16 d, 4 bytes holding bit 4 of each q = c + 16, 16 bytes of low nibbles
  (element j and j + 16 share byte j).
* Q4_K (144 bytes per 256): fp16 d, fp16 dmin, 12 bytes of eight 6-bit scales and mins, 128 bytes of
  nibbles (each 64 weights: sub-block 2i in the low nibbles of 32 bytes, 2i + 1 in the high ones).
  Q5_K (176) adds 32 bytes before the nibbles whose bit i is bit 4 of sub-block i's code.
* Q6_K (210 bytes per 256): 16 sub-blocks of 16 codes q in [-32, 31], each with an int8 scale l, one fp16
  d; a weight is d * l * q. Stored as q + 32: low nibbles in `ql` (128 bytes), high two bits in `qh`
  (64), then the 16 scales and d.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..enums import GGUFType
from ..grids import (
    BLOCK_BITS,
    FALLBACKS,
    GRIDS,
    K_GRIDS,
    MIX_RULES,
    SUPER_BLOCK,
    BlockGrid,
    choose,
    fitted,
    round_codes,
    two_level,
    values,
)
from ..ops import quantize_weight, searched_scale

BLOCK = 32  # weights per Q4_0 / Q8_0 block
FLOATS = (GGUFType.F32, GGUFType.F16, GGUFType.BF16)
FILE_TYPES = {GGUFType.F32: "ALL_F32", GGUFType.F16: "MOSTLY_F16", GGUFType.BF16: "MOSTLY_BF16",
              GGUFType.Q4_0: "MOSTLY_Q4_0", GGUFType.Q5_0: "MOSTLY_Q5_0", GGUFType.Q8_0: "MOSTLY_Q8_0",
              GGUFType.Q4_1: "MOSTLY_Q4_1", GGUFType.Q5_1: "MOSTLY_Q5_1", GGUFType.Q4_K_M: "MOSTLY_Q4_K_M",
              GGUFType.Q4_K: "MOSTLY_Q4_K_M", GGUFType.Q5_K_M: "MOSTLY_Q5_K_M", GGUFType.Q5_K: "MOSTLY_Q5_K_M",
              GGUFType.Q6_K: "MOSTLY_Q6_K", GGUFType.IQ4_NL: "MOSTLY_IQ4_NL",
              GGUFType.IQ4_XS: "MOSTLY_IQ4_XS"}  # general.file_type (LlamaFileType)


@dataclass(frozen=True)
class Mix:
    """The types of one GGUF file type: block linears, token embedding, output head (and its fallback)."""

    blocks: GGUFType
    embedding: GGUFType
    head: GGUFType
    head_fallback: GGUFType  # when the head's row width is not a multiple of SUPER_BLOCK

    def head_type(self, width: int) -> GGUFType:
        return self.head if width % SUPER_BLOCK == 0 else self.head_fallback

    def embedding_type(self, width: int) -> GGUFType:
        """The embedding's type for rows of `width`: a super-block type falls back as llama.cpp's does."""
        return fitted(self.embedding, width)


MIXES = {t: Mix(t, t, t, t) for t in FLOATS} | {
    GGUFType.Q4_0: Mix(GGUFType.Q4_0, GGUFType.Q4_0, GGUFType.Q6_K, GGUFType.Q8_0),
    GGUFType.Q8_0: Mix(GGUFType.Q8_0, GGUFType.Q8_0, GGUFType.Q8_0, GGUFType.Q8_0),
    GGUFType.Q4_K_M: Mix(GGUFType.Q4_K_M, GGUFType.Q4_K, GGUFType.Q6_K, GGUFType.Q8_0),
    GGUFType.Q5_K_M: Mix(GGUFType.Q5_K_M, GGUFType.Q5_K, GGUFType.Q6_K, GGUFType.Q8_0),
    GGUFType.Q6_K: Mix(GGUFType.Q6_K, GGUFType.Q6_K, GGUFType.Q6_K, GGUFType.Q8_0),
    GGUFType.IQ4_NL: Mix(GGUFType.IQ4_NL, GGUFType.IQ4_NL, GGUFType.Q6_K, GGUFType.Q8_0),
    GGUFType.IQ4_XS: Mix(GGUFType.IQ4_XS, GGUFType.IQ4_XS, GGUFType.Q6_K, GGUFType.Q8_0),
}


def block_types(mix: Mix) -> set[GGUFType]:
    """The types a quantized mix may give block linears (its rule's, and llama.cpp's fallbacks)."""
    types = set(MIX_RULES[mix.blocks].types)
    return types | {FALLBACKS[t] for t in types if t in FALLBACKS}


def layer_type(w_bits: int, grid: BlockGrid | None) -> GGUFType | None:
    """The GGUF type a calibrated layer's codes are in: its grid's (K-quants, Q4_1 / Q5_1), else the per-32
    block type of its bits (None: no GGUF type holds them exactly)."""
    if grid is not None:
        return grid.gguf_type
    return {bits: qtype for qtype, bits in BLOCK_BITS.items()}.get(w_bits)


def layer_blocks(codes: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor | None, group_size: int,
                 qtype: GGUFType) -> np.ndarray:
    """The bytes (N, ...) of a calibrated layer's codes (N, K) int8, scales and mins in `qtype`."""
    if qtype in BLOCK_BITS or qtype is GGUFType.IQ4_NL:  # IQ4_NL: Q4_0's bytes, the nibbles index levels
        return q_blocks(codes, scale, group_size, GRIDS[qtype].bits if qtype in GRIDS else BLOCK_BITS[qtype])
    if qtype is GGUFType.IQ4_XS:
        return _iq4_xs_blocks(codes, scale)
    if qtype in K_GRIDS:
        return _k_blocks(codes, scale, mins, qtype)
    return _q1_blocks(codes, scale, mins, GRIDS[qtype].bits)


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
    if qtype in BLOCK_BITS:
        codes, scale = _block_codes(w, qtype)
        return q_blocks(codes, scale, BLOCK, BLOCK_BITS[qtype]), qtype.value
    if qtype in GRIDS:
        scale, mins = choose(GRIDS[qtype], w)
        return layer_blocks(round_codes(GRIDS[qtype], w, scale, mins), scale, mins, GRIDS[qtype].group,
                            qtype), qtype.value
    raise ValueError(f"cannot write a float tensor as {qtype.value}")


def rounded(w: torch.Tensor, qtype: GGUFType) -> torch.Tensor:
    """w (N, K) float as `qtype` stores it (a file type: its embedding's type), float32, such that `encode`
    writes these values back exactly. Block types: their own scale is among the candidates, with zero
    error. Grids with mins or two-level scales: rounding is repeated until it changes nothing (a search on
    rounded values can pick a slightly different grid; here two or three passes, same error)."""
    w = w.detach().float()
    qtype = MIXES[qtype].embedding_type(w.shape[1]) if qtype in MIX_RULES else qtype
    if qtype not in GRIDS:
        codes, scale = _block_codes(w, qtype)
        return codes.float() * scale.repeat_interleave(BLOCK, dim=1)
    grid = GRIDS[qtype]
    for _ in range(8):
        scale, mins = choose(grid, w)
        w, before = values(grid, round_codes(grid, w, scale, mins), scale, mins), w
        if torch.equal(w, before):
            break
    return w


def _block_codes(w: torch.Tensor, qtype: GGUFType) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (N, K) int8 and searched fp16-exact scales (N, K / 32) of w (N, K) float32 in Q4_0 / Q5_0 / Q8_0."""
    scale = searched_scale(w, BLOCK_BITS[qtype], BLOCK, scale_dtype=torch.float16)  # (N, K / 32)
    return quantize_weight(w, scale, BLOCK_BITS[qtype], BLOCK), scale


def q_blocks(codes: torch.Tensor, scale: torch.Tensor, group_size: int, w_bits: int) -> np.ndarray:
    """Q4_0 / Q5_0 / Q8_0 bytes of codes (N, K) int8 with scale (N, n_groups): (N, K / 32 * block bytes)."""
    n, k = codes.shape
    d = scale.float().repeat_interleave((k if group_size == -1 else group_size) // BLOCK, dim=1)  # (N, K/32)
    d = d.to(torch.float16).numpy().view(np.uint8).reshape(n, k // BLOCK, 2)  # little-endian fp16 bytes
    c = codes.reshape(n, k // BLOCK, BLOCK)
    if w_bits == 8:
        return np.concatenate([d, c.view(torch.uint8).numpy()], axis=-1).reshape(n, -1)
    q = (c.to(torch.int16) + 2 ** (w_bits - 1)).to(torch.uint8)  # [0, 2^b - 1]
    qs = (q[..., :16] & 0xF) | ((q[..., 16:] & 0xF) << 4)  # element j low nibble, j + 16 high nibble
    if w_bits == 4:
        return np.concatenate([d, qs.numpy()], axis=-1).reshape(n, -1)
    bits = (q.to(torch.int64) >> 4) << torch.arange(BLOCK)  # (N, B, 32): bit 4 of element j at bit j
    qh = bits.sum(-1).to(torch.int32).numpy().astype("<u4").view(np.uint8).reshape(n, k // BLOCK, 4)
    return np.concatenate([d, qh, qs.numpy()], axis=-1).reshape(n, -1)


def _q1_blocks(codes: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor, bits: int) -> np.ndarray:
    """Q4_1 / Q5_1 bytes of codes (N, K) with per-32 fp16 scales and mins: fp16 d, fp16 m (the offset, -min),
    then the codes q = c + 2^(b-1) as Q4_0 / Q5_0 lay them out."""
    n, k = codes.shape
    q_part = q_blocks(codes, scale, BLOCK, bits).reshape(n, k // BLOCK, -1)  # (N, B, 2 + ...): d, then codes
    m = (-mins.float()).to(torch.float16).numpy().view(np.uint8).reshape(n, k // BLOCK, 2)
    return np.concatenate([q_part[..., :2], m, q_part[..., 2:]], axis=-1).reshape(n, -1)


def _iq4_xs_blocks(codes: torch.Tensor, scale: torch.Tensor) -> np.ndarray:
    """IQ4_XS bytes (N, K / 256 * 136): fp16 d, 16 bits holding the top two bits of eight 6-bit scales l + 32,
    4 bytes of their low nibbles, then each 32 indices as Q4_0 lays them out."""
    n, k = codes.shape
    s = k // SUPER_BLOCK
    d, levels = two_level(scale, GRIDS[GGUFType.IQ4_XS].levels, 8)  # (N, S), (N, K / 32)
    lu = (levels + 32).reshape(n, s, 8).to(torch.int64)  # (N, S, 8) in [0, 63]
    high = ((lu >> 4) << (2 * torch.arange(8))).sum(-1).to(torch.int32).numpy().astype("<u2").view(np.uint8)
    low = ((lu[..., 0::2] & 15) | ((lu[..., 1::2] & 15) << 4)).to(torch.uint8).numpy()  # (N, S, 4)
    nibbles = q_blocks(codes, torch.ones(n, k // BLOCK), BLOCK, 4).reshape(n, s, 8, 18)[..., 2:]  # drop the d's
    parts = [d.reshape(n, s, 1).numpy().view(np.uint8), high.reshape(n, s, 2), low, nibbles.reshape(n, s, 128)]
    return np.concatenate(parts, axis=-1).reshape(n, -1)


def _k_blocks(codes: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor | None, qtype: GGUFType) -> np.ndarray:
    """Q4_K / Q5_K / Q6_K bytes (N, K / 256 * block bytes) of codes (N, K) with per-group scales and mins."""
    grid = K_GRIDS[qtype]
    n, k = codes.shape
    if k % SUPER_BLOCK:
        raise ValueError(f"{qtype.value} needs rows of a multiple of {SUPER_BLOCK} weights, got {k}")
    s = k // SUPER_BLOCK
    stored = grid.offset if grid.asymmetric else -grid.code_range[0]  # the file's codes are unsigned
    q = (codes.to(torch.int16) + stored).reshape(n, s, SUPER_BLOCK)  # (N, S, 256)
    d, levels = two_level(scale, grid.levels, SUPER_BLOCK // grid.group)  # (N, S) fp16, (N, K / g) int16
    if not grid.asymmetric:
        return _pack_q6_k(q, levels.reshape(n, s, -1).to(torch.int8), d.reshape(n, s, 1)).reshape(n, -1)
    dmin, mlv = two_level(mins, grid.levels, SUPER_BLOCK // grid.group)
    sc, mn = levels.reshape(n, s, 8).to(torch.uint8), mlv.reshape(n, s, 8).to(torch.uint8)
    packed_scales = torch.cat([(sc[..., :4] & 63) | ((sc[..., 4:] >> 4) << 6),  # (N, S, 12)
                               (mn[..., :4] & 63) | ((mn[..., 4:] >> 4) << 6),
                               (sc[..., 4:] & 15) | ((mn[..., 4:] & 15) << 4)], -1)
    pairs = q.reshape(n, s, 4, 2, 32).to(torch.uint8)  # (N, S, chunk, sub-block of the pair, 32)
    qs = (pairs[:, :, :, 0] & 0xF) | ((pairs[:, :, :, 1] & 0xF) << 4)  # (N, S, 4, 32)
    parts = [d.reshape(n, s, 1).numpy().view(np.uint8), dmin.reshape(n, s, 1).numpy().view(np.uint8),
             packed_scales.numpy()]
    if grid.bits == 5:
        high = (q.reshape(n, s, 8, 32).to(torch.int64) >> 4) << torch.arange(8).reshape(1, 1, 8, 1)
        parts.append(high.sum(2).to(torch.uint8).numpy())  # (N, S, 32): bit i from sub-block i
    parts.append(qs.reshape(n, s, 128).numpy())
    return np.concatenate(parts, axis=-1).reshape(n, -1)


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
