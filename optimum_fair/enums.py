"""Every choice of optimum-fair as a str-Enum, in one module that imports nothing but the standard library.

The config (`config.py`) and every layer below it (`ops`, `nn`, `calib`, `scoring`, `pipeline`) type
their arguments with these, so a value checked once in `FairCalibConfig` stays an enum all the way down.
A member equals its string (``Rounding.GPTQ == "gptq"``); `coerce_enum` turns user input into a member.
"""

from __future__ import annotations

from enum import Enum
from typing import TypeVar

E = TypeVar("E", bound=Enum)


# -- quantization format and Stage II -----------------------------------------------------------
class Rounding(str, Enum):
    """How weights are rounded to the grid."""

    RTN = "rtn"  # round to nearest
    GPTQ = "gptq"  # (weighted) GPTQ: H = sum_i w_i x_i x_i^T


class Transform(str, Enum):
    """Invertible transform applied in front of each converted linear before quantization."""

    NONE = "none"
    HADAMARD = "hadamard"  # randomised Hadamard rotation (QuaRot-style)
    FLATQUANT = "flatquant"  # learned Kronecker-factored affine + diagonal scale + clipping


class KronInit(str, Enum):
    """How a transform's Kronecker factors A, B start (`calib.transforms.KRON_INITS`)."""

    HADAMARD = "hadamard"  # random signed Hadamard factors (`calib.rotation.random_hadamard_factors`)
    IDENTITY = "identity"  # A = I, B = I (still learnable)
    NONE = "none"  # no Kronecker factors


class WeightGrid(str, Enum):
    """Which codes of the signed b-bit grid a weight row uses, i.e. what its scale divides max|w| by."""

    FULL = "full"  # scale = max|w| / (2^(b-1) - 1/2): all of [-2^(b-1), 2^(b-1) - 1] (GGUF, compressed-tensors)
    SYMMETRIC = "symmetric"  # scale = max|w| / (2^(b-1) - 1): [-(2^(b-1) - 1), 2^(b-1) - 1] (format version 1)
    # all of [-2^(b-1), 2^(b-1) - 1], each group's (signed) scale picked by an importance-weighted search of
    # its round-off, as llama.cpp's quantizers do (GGUF targets): `ops.searched_scale`
    SEARCH = "search"


class GGUFType(str, Enum):
    """A GGUF tensor type (llama.cpp's names) that optimum-fair calibrates in or writes."""

    F32 = "F32"
    F16 = "F16"
    BF16 = "BF16"
    Q8_0 = "Q8_0"  # blocks of 32: fp16 scale, int8 codes
    Q4_0 = "Q4_0"  # blocks of 32: fp16 scale, 4-bit codes in [-8, 7]
    Q5_0 = "Q5_0"  # blocks of 32: fp16 scale, 5-bit codes in [-16, 15]
    Q4_1 = "Q4_1"  # blocks of 32: fp16 scale and min, 4-bit codes in [0, 15]
    Q5_1 = "Q5_1"  # blocks of 32: fp16 scale and min, 5-bit codes in [0, 31]
    Q4_K = "Q4_K"  # super-blocks of 256: fp16 d / dmin, 8 six-bit scales and mins, 4-bit codes in [0, 15]
    Q5_K = "Q5_K"  # as Q4_K with 5-bit codes in [0, 31]
    Q6_K = "Q6_K"  # super-blocks of 256: fp16 scale, 16 int8 sub-scales, 6-bit codes in [-32, 31]
    IQ4_NL = "IQ4_NL"  # blocks of 32: fp16 scale, 4-bit indices into llama.cpp's non-uniform levels
    IQ4_XS = "IQ4_XS"  # super-blocks of 256: fp16 d, 8 six-bit scales, IQ4_NL's indices
    Q4_K_M = "Q4_K_M"  # llama.cpp's file types that mix tensor types (`grids.MIX_RULES`)
    Q5_K_M = "Q5_K_M"


class Weighting(str, Enum):
    """Token weights w_i in the Stage II loss."""

    FAIR = "fair"  # the Stage I position prior
    UNIFORM = "uniform"  # w_i = 1 (the ablation)


class InputMode(str, Enum):
    """Where Stage II takes block l's input from."""

    QUANTIZED = "quantized"  # output of the already-quantized prefix (default)
    FP = "fp"  # output of the full-precision prefix (FlatQuant's variant)
    # the quantized prefix's output, with each GPTQ linear's target its output on the FP prefix's (GPTAQ's
    # asymmetric calibration): the rounding also undoes the drift the quantized prefix left
    CORRECTED = "corrected"


class CalibInputs(str, Enum):
    """What Stage II feeds the model."""

    TEXT = "text"  # fully observed calibration text (the paper)
    MASKED = "masked"  # decode-like partially masked states of that text (DLLMQuant / Quant-dLLM style)


# -- Stage I and the metrics --------------------------------------------------------------------
class Confidence(str, Enum):
    """How a model's confidence at a masked position is scored: the reliability c_{t,i} of Stage I and
    the commit rule of the stability metrics."""

    PROB = "prob"  # max probability
    MARGIN = "margin"  # top-1 minus top-2 probability
    NEG_ENTROPY = "neg_entropy"  # sum p log p


#: The config's name for `Confidence` (the paper's teacher reliability c_{t,i}).
Reliability = Confidence


class BoostSchedule(str, Enum):
    """lambda_0(t) schedule for the frontier-hit term."""

    EARLY = "early"  # 1 + beta * (1 - (t-1)/(T-1))
    FLAT = "flat"  # 1
    LATE = "late"  # 1 + beta * (t-1)/(T-1)


class ProbePolicy(str, Enum):
    """How Stage I's probe rollouts commit (issue 34: the prior under the serving policy)."""

    RANDOM = "random"  # the paper's random commit order, one per step (`Remasking.RANDOM`)
    THRESHOLD = "threshold"  # greedy low-confidence decode with `CommitRule.THRESHOLD`
    FACTOR = "factor"  # greedy low-confidence decode with `CommitRule.FACTOR`


# -- samplers -----------------------------------------------------------------------------------
class Remasking(str, Enum):
    """LLaDA's rule for which masked positions of the current block are committed."""

    LOW_CONFIDENCE = "low_confidence"  # highest probability of the chosen token first
    RANDOM = "random"  # uniformly random masked positions (Stage I's random commit policy)


class DreamAlg(str, Enum):
    """Dream's ``diffusion_generate`` algorithms."""

    ORIGIN = "origin"  # each masked position unmasks with probability 1 - s/t
    MASKGIT_PLUS = "maskgit_plus"  # confidence = probability of the chosen token
    TOPK_MARGIN = "topk_margin"  # confidence = top-1 minus top-2 probability
    ENTROPY = "entropy"  # confidence = negative entropy


class CommitRule(str, Enum):
    """How many masked positions of the current block a decoding step commits (issue 34; Fast-dLLM)."""

    SCHEDULE = "schedule"  # the sampler's fixed count (one per step when steps = gen_length)
    THRESHOLD = "threshold"  # also every position whose proposal has probability >= threshold
    FACTOR = "factor"  # also the n most confident while (k + 1)(1 - p_k) <= factor for every k <= n


class CacheMode(str, Enum):
    """Fast-dLLM's approximate KV cache while a block is decoded."""

    NONE = "none"  # a full forward at every step (exact)
    PREFIX = "prefix"  # prompt and finished blocks cached, refreshed when a block completes
    DUAL = "dual"  # the masked suffix after the block cached too


class Algorithm(str, Enum):
    """Which sampler `generate` runs."""

    LLADA = "llada"  # semi-autoregressive blocks, fixed commits per step
    DREAM = "dream"  # Dream's diffusion_generate schedule
    LLADA2 = "llada2"  # block-causal attention, threshold commits (LLaDA2's generate)


class LikelihoodEstimator(str, Enum):
    """How `eval.likelihood` draws the masks of its Monte-Carlo log-likelihood estimate."""

    LLADA = "llada"  # k of the L target tokens masked, k stratified over 1..L across a batch, weight L / k
    DREAM = "dream"  # each target token masked with probability p, p stratified over [eps, 1], weight 1 / p


class PostCommitMode(str, Enum):
    """How the top-1 at an already committed position is read (`eval.metrics.post_commit_mismatch`)."""

    LOO = "loo"  # leave-one-out: re-mask only that position and read the prediction there
    RAW = "raw"  # the raw output at the unmasked position (untrained noise for LLaDA-objective models)


def coerce_enum(enum_cls: type[E], value: object, name: str) -> E:
    """Return ``value`` as a member of ``enum_cls``; raise ValueError naming ``name`` otherwise."""
    if isinstance(value, enum_cls):
        return value
    try:
        return enum_cls(value)
    except ValueError:
        allowed = [m.value for m in enum_cls]
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}") from None
