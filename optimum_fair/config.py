"""`FairCalibConfig`: every knob of FAIR-Calib, checked on construction.

The config is the API (STYLE.md): `from_pretrained(..., quantization_config=FairCalibConfig(...))`
and `quantize(model, FairCalibConfig(...), texts)` take the same object, and the checkpoint's
`config.json` stores it under `quantization_config`. Field names follow the paper where it has a
symbol (N_probe, K, beta, lambda_1, epsilon) in arXiv 2606.06547; docs/method.md says which defaults are the
paper's and which are ours.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from enum import Enum
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from .devices import COMPUTE_DTYPES
from .enums import (
    BoostSchedule,
    CacheMode,
    CalibInputs,
    GGUFType,
    InputMode,
    ProbePolicy,
    Reliability,
    Rounding,
    Transform,
    WeightGrid,
    Weighting,
    coerce_enum,
)
from .naming import is_repo_id

# 2: weight_grid (version-1 checkpoints were written on the symmetric grid). gguf_type and the searched grid
# (negative scales) came later without a new version: a reader that lacks them refuses the field by name.
CONFIG_VERSION = 2

#: The GGUF types calibration rounds in: (w_bits, weights per scale). The others are written by the export.
GGUF_GRIDS = {GGUFType.Q4_0: (4, 32), GGUFType.Q8_0: (8, 32),  # a mix (K types): its base type's
              GGUFType.Q4_K_M: (4, 32), GGUFType.Q5_K_M: (5, 32), GGUFType.Q6_K: (6, 16),
              GGUFType.IQ4_NL: (4, 32), GGUFType.IQ4_XS: (4, 32)}


_ENUM_FIELDS = {
    "rounding": Rounding,
    "transform": Transform,
    "weighting": Weighting,
    "reliability": Reliability,
    "boost_schedule": BoostSchedule,
    "input_mode": InputMode,
    "calib_inputs": CalibInputs,
    "weight_grid": WeightGrid,
    "stage1_policy": ProbePolicy,
    "stage1_cache": CacheMode,
}

logger = logging.getLogger(__name__)
_LOCAL_FIELDS = ("cache_dir", "prior", "push_to_hub")  # one run's folders and repo: never serialised, never read back



@dataclass
class FairCalibConfig(QuantizationConfigMixin):
    """Configuration of FAIR-Calib post-training quantization.

    Quantization format
        w_bits: weight bits, 4 or 8, per output channel or per group.
        a_bits: activation bits, 4, 8 or 16 (16 = activations stay in floating point, i.e. W4A16).
            Activations are quantized per token, symmetric.
        group_size: -1 for one scale per output channel, else a positive divisor of every converted
            layer's input size.
        sym: True (default): symmetric codes, value = code * scale. False: each group (or row) also stores a
            min, value = scale * (code + 2^(b-1)) - min, both fp16 (`grids.asymmetric_grid`; GGUF Q4_1 /
            Q5_1 at group_size 32). Needs transform "none" or "hadamard" (FlatQuant's learned clips train
            on the symmetric grid); runs on the reference kernel; exports to GGUF, not compressed-tensors.
        weight_grid: "full" (default): a row's scale is max|w| / 7.5 (int4; / 127.5 for int8), so its codes
            use all of [-8, 7] as GGUF and compressed-tensors do; "symmetric": max|w| / 7, codes in
            [-7, 7], the grid of format version 1 (a version-1 config reads as "symmetric"). Checkpoints
            store their scales, so either loads exactly; the field says how they were made. "search": each
            group's (signed) scale is the one of least round-off weighted by the Hessian diagonal (GPTQ)
            among llama.cpp's candidates (`ops.searched_scale`); what `gguf_type` uses.
        gguf_type: calibrate in the exact grid of this GGUF file type ("Q4_0", "Q8_0", or llama.cpp's mixes
            "Q4_K_M", "Q5_K_M", "Q6_K", "IQ4_NL", "IQ4_XS": each block linear in the type llama-quantize gives
            it, with its fallbacks for widths not a multiple of 256), so that `export(..., "gguf")` writes the codes as
            they are: sets w_bits (the base type's: 4 / 8 / 4 / 5 / 6 / 4 / 4), group_size (32; 16 for Q6_K),
            weight_grid "search", a_bits 16 (GGUF holds weights only; llama.cpp
            quantizes activations itself) and transform "none" (GGUF has no online transforms). Values of
            those fields other than their defaults and the type's own are refused. None (default): no
            GGUF target. Pair it with rounding="gptq" for calibrated codes, and input_mode="corrected"
            for the best file measured (docs/export.md).
        rounding: "rtn" (default, as FlatQuant) or "gptq" (weighted GPTQ, H = sum_i w_i x_i x_i^T).
        transform: "flatquant" (default, the paper's base quantizer: learned Kronecker transforms,
            smoothing and clipping), "hadamard" (fixed random rotation) or "none".
            rounding="rtn" with transform="none" needs no calibration data.
        fold_rotation: rotate the residual stream by a random orthogonal matrix (Hadamard with random
            signs, seeded by `seed`) folded into the embedding, the block linears and the head, norm
            gains folded into the linears after them (QuaRot's offline part; `calib.fold`), before
            calibration. The model is the same function in float and keeps its plain graph, so a GGUF
            export runs as it is in llama.cpp; the rotated weights round with less error (docs/export.md).
            LLaDA and Dream (dense pre-norm blocks, an untied head). Default False.
        weighting: "fair" (Stage I prior w-bar) or "uniform" (w-bar = 1).

    Stage I (position prior from the full-precision teacher; the paper's section 2)
        num_probes: N_probe, the number of probe rollouts (paper: 512).
        window: K, the generation window at the tail of each calibration sequence (paper: 256).
            None = seq_len // 4, the paper's 256 / 1024.
        block_length: semi-autoregressive block length of the random commit policy. None = 32, or the
            largest divisor of the window below 32 when the window is shorter or not a multiple of 32.
        steps: T, denoising steps over the window. None = window (one token per step).
        early_boost: beta in lambda_0(t) = 1 + beta * (1 - (t-1)/(T-1)). The paper boosts early steps
            without giving beta; default 1. beta = 3 was the best of an exploratory study
            (docs/results.md), did not replicate on held-out data and raised the flip rate against
            uniform weighting in a pre-stated confirmatory run, so it is not the default: nothing
            becomes a default on an exploratory result.
        boost_schedule: "early" (default), "flat" or "late" (ablations).
        reliability: c_{t,i}: "prob" (max probability, default), "neg_entropy" or "margin".
        reliability_weight: lambda_1. None = 1/T. 0 = the frontier-only ablation.
        frontier_weight: multiplier of the frontier-hit term (1, the paper; 0 = the reliability-only
            ablation). It and reliability_weight must not both be 0.
        floor: epsilon, the weight of positions outside the window (default 0.05).
        prior: path of a saved `PositionPrior` to reuse (skips Stage I). A prior saved with its rollout
            statistics (every prior Stage I builds) that differs from this config only in the weighting
            (`early_boost`, `boost_schedule`, `reliability_weight`, `floor`, `frontier_weight`) is
            re-weighted from its rollouts, without new probes.
        strict_prior: a reused prior made with other decode settings raises (True, default) or warns.
        stage1_policy: how the probe rollouts commit (issue 34, docs/decoding.md): "random" (default, the
            paper's random commit order, one token per step), "threshold" or "factor": the teacher's greedy
            low-confidence decode under the serving policy (Fast-dLLM's rules, several commits per step).
            Saved with the prior: a saved prior of another policy is refused (warned with strict_prior=False).
        stage1_threshold: the "threshold" policy's confidence threshold, in (0, 1] (default 0.9); the other
            policies ignore it.
        stage1_factor: the "factor" policy's factor f > 0 (default 1.0); the other policies ignore it.
        stage1_cache: "none" (default: a full forward at every rollout step) or "prefix": the rollouts run on
            Fast-dLLM's prefix KV cache (LLaDA, Dream, LLaDA-MoE), exact at each block's first step; the prior
            stays within 1 % (relative L2) of the uncached one. Recorded in the prior, not compared on reuse.
        compute_dtype: the dtype of the forwards of both stages (Stage I's probe rollouts; Stage II's
            block forwards: targets, Hessian and statistics inputs, the quantized stream, the learned
            transforms' steps): "auto" (default: bfloat16 where the CPU or GPU computes it natively, else
            float32; see `optimum_fair.devices.fast_dtype`), "float32" (forces full precision),
            "bfloat16" or "float16". The weights are left as they are (autocast); Hessians, GPTQ and the
            rounding are float32 / float64 either way.

    Stage II (block-wise calibration; the paper's section 3)
        dataset: calibration text: "wiki", "wiki-val", "lee", a Hub dataset name, a list of
            strings or a `datasets.Dataset` with a "text" column, or one with an "input_ids" column
            (already tokenized, one document per row). Only names are written to config.json.
        num_samples: calibration sequences (FlatQuant: 128).
        seq_len: tokens per calibration sequence (paper: 1024). None = min(1024, model maximum).
        epochs: optimisation epochs per block for learned transforms (FlatQuant: 15).
        lr: learning rate of the learned transforms (FlatQuant: 5e-3).
        clip_lr: learning rate of the learned clipping (FlatQuant: 5e-2).
        batch_size: calibration batch size (FlatQuant: 4).
        damp: GPTQ dampening, as a fraction of the mean Hessian diagonal.
        act_order: GPTQ column order by decreasing Hessian diagonal.
        true_sequential: GPTQ Hessians group by group, each from a pass of the block with the earlier
            groups already quantized (True, AutoGPTQ's `true_sequential`), or every group's from one pass
            of the float block (False, the default, as llm-compressor: fewer block passes, more Hessians in
            memory at once; on the shipped model 13.3 s against 21.3 s at equal quality, docs/results.md).
        loss_samples: how many calibration samples (the first ones) score each block's logged loss
            before (RTN) and after calibration, for the log and the card. Where nothing else needs the
            full-precision targets (GPTQ or fixed transforms, quantized inputs) only these go through
            the FP block and the RTN block, which saves two of GPTQ's four passes over the samples;
            FlatQuant-style fits and input_mode="fp" use every sample anyway. None = all (default 16).
        input_mode: "quantized" (block input from the quantized prefix), "fp", or "corrected": the
            quantized prefix's output, with each GPTQ group rounding the weight whose output on it matches
            the FP weight's on the FP prefix's output (GPTAQ's asymmetric calibration; `gptq.drift_target`),
            so the rounding also undoes the drift of earlier blocks. Needs rounding="gptq"; a routed
            expert's group is rounded as under "quantized".
        calib_inputs: "text" (fully observed calibration text, the paper) or "masked": each sample is
            put in a decode state at a random step of the Stage I commit policy (earlier blocks
            committed, the current one partly, later ones masked), and with fair weighting the
            still-masked positions of the current block keep their prior weight while the others get
            `floor` times theirs (`optimum_fair.scoring.states`).
        tokenizer: tokenizer (or its path) for `dataset`; only a Hub id is written to config.json (a
            local path is this machine's, see below).
        seed: seed of probe rollouts, sample selection and Hadamard signs.
        cache_dir: directory where finished blocks are written, to resume an interrupted run.

    Machine-local settings (`cache_dir`, `prior`, a local `tokenizer` path, and the `push_to_hub` repo) steer
    one run on one machine: they are never written into config.json or the model card (written as null),
    and `from_dict` (a config read from a published config.json) ignores them, so a reused config never
    reads or writes a folder, or pushes to a repo, that its user did not name.

    Other
        modules_to_not_convert: module names left in floating point. None = transformers' default
            (the LM head and tied embeddings). Embeddings are never converted.
        push_to_hub: repo id to push the quantized model to at the end of calibration.
        version: format version of this config.
    """

    quant_method: str = "fair_calib"
    w_bits: int = 4
    a_bits: int = 4
    group_size: int = -1
    sym: bool = True
    weight_grid: WeightGrid = WeightGrid.FULL
    gguf_type: GGUFType | None = None
    rounding: Rounding = Rounding.RTN
    transform: Transform = Transform.FLATQUANT
    fold_rotation: bool = False
    weighting: Weighting = Weighting.FAIR
    # Stage I
    num_probes: int = 512
    window: int | None = None
    block_length: int | None = None
    steps: int | None = None
    early_boost: float = 1.0
    boost_schedule: BoostSchedule = BoostSchedule.EARLY
    reliability: Reliability = Reliability.PROB
    reliability_weight: float | None = None
    frontier_weight: float = 1.0
    floor: float = 0.05
    prior: str | None = None
    strict_prior: bool = True
    stage1_policy: ProbePolicy = ProbePolicy.RANDOM
    stage1_threshold: float = 0.9
    stage1_factor: float = 1.0
    stage1_cache: CacheMode = CacheMode.NONE
    compute_dtype: str = "auto"
    # Stage II
    dataset: Any = "wiki"
    num_samples: int = 128
    seq_len: int | None = None
    epochs: int = 15
    lr: float = 5e-3
    clip_lr: float = 5e-2
    batch_size: int = 4
    damp: float = 0.01
    act_order: bool = False
    true_sequential: bool = False
    loss_samples: int | None = 16
    input_mode: InputMode = InputMode.QUANTIZED
    calib_inputs: CalibInputs = CalibInputs.TEXT
    tokenizer: Any = None
    seed: int = 0
    cache_dir: str | None = None
    # other
    modules_to_not_convert: list[str] | None = None
    push_to_hub: str | None = None
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        if self.quant_method != "fair_calib":
            raise ValueError(f"quant_method must be 'fair_calib', got {self.quant_method!r}")
        for name, enum in _ENUM_FIELDS.items():
            setattr(self, name, coerce_enum(enum, getattr(self, name), name))
        self._check_format()
        self._check_stage_one()
        self._check_stage_two()
        self._check_other()

    # -- checks -----------------------------------------------------------------------------
    def _check_format(self) -> None:
        _check_choice("w_bits", self.w_bits, (4, 5, 6, 8) if self.gguf_type is not None else (4, 8))
        _check_choice("a_bits", self.a_bits, (4, 8, 16))
        _check_type("group_size", self.group_size, int)
        if self.group_size != -1 and self.group_size <= 0:
            raise ValueError(f"group_size must be -1 (per channel) or a positive integer, got {self.group_size}")
        _check_type("sym", self.sym, bool)
        if not self.sym and self.transform is Transform.FLATQUANT:
            raise ValueError(f"sym=False needs transform 'none' or 'hadamard', got {_plain(self.transform)!r} "
                             "(FlatQuant's learned clips train on the symmetric grid)")
        if not self.sym and self.gguf_type is not None:
            raise ValueError("sym=False with gguf_type: the GGUF type fixes the grid (its K-quants have mins); "
                             "leave sym at True")
        _check_type("fold_rotation", self.fold_rotation, bool)
        if self.gguf_type is not None:
            self._apply_gguf_type()

    def _apply_gguf_type(self) -> None:
        """gguf_type fixes the weight format; a conflicting non-default value is refused, naming the field."""
        self.gguf_type = coerce_enum(GGUFType, self.gguf_type, "gguf_type")
        if self.gguf_type not in GGUF_GRIDS:
            raise ValueError(f"gguf_type must be one of {[t.value for t in GGUF_GRIDS]} (the types calibration "
                             f"rounds in; export writes the others), got {self.gguf_type.value!r}")
        bits, block = GGUF_GRIDS[self.gguf_type]
        wanted = {"w_bits": bits, "a_bits": 16, "group_size": block, "weight_grid": WeightGrid.SEARCH,
                  "transform": Transform.NONE}
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name, value in wanted.items():
            if getattr(self, name) not in (value, defaults[name]):
                raise ValueError(f"gguf_type={self.gguf_type.value!r} needs {name}={_plain(value)!r}, got "
                                 f"{_plain(getattr(self, name))!r}")
            setattr(self, name, value)

    def _check_stage_one(self) -> None:
        _check_positive_int("num_probes", self.num_probes)
        _check_positive_int("window", self.window, optional=True)
        _check_positive_int("block_length", self.block_length, optional=True)
        _check_positive_int("steps", self.steps, optional=True)
        _check_nonneg_float("early_boost", self.early_boost)
        _check_nonneg_float("reliability_weight", self.reliability_weight, optional=True)
        _check_nonneg_float("frontier_weight", self.frontier_weight)
        if self.frontier_weight == 0 and self.reliability_weight == 0:
            raise ValueError("frontier_weight and reliability_weight are both 0: the prior would be empty")
        _check_nonneg_float("floor", self.floor)
        if self.floor > 1:
            raise ValueError(f"floor must be in [0, 1] (weight outside the window), got {self.floor}")
        _check_type("prior", self.prior, str, optional=True)
        _check_type("strict_prior", self.strict_prior, bool)
        _check_choice("compute_dtype", self.compute_dtype, COMPUTE_DTYPES)
        _check_nonneg_float("stage1_threshold", self.stage1_threshold)
        if not 0 < self.stage1_threshold <= 1:
            raise ValueError(f"stage1_threshold must be in (0, 1], got {self.stage1_threshold}")
        _check_nonneg_float("stage1_factor", self.stage1_factor)
        if self.stage1_factor <= 0:
            raise ValueError(f"stage1_factor must be > 0, got {self.stage1_factor}")
        if self.stage1_cache is CacheMode.DUAL:
            raise ValueError("stage1_cache must be 'none' or 'prefix', got 'dual': Stage I reads the reliability of "
                             "every masked position, so the suffix cannot be cached")
        if self.window is not None and self.block_length is not None and self.window % self.block_length:
            raise ValueError(
                f"window ({self.window}) must be a multiple of block_length ({self.block_length})"
            )
        if self.window is not None and self.steps is not None:
            check_steps(self.steps, self.window, self.resolved_block_length(self.window))

    def _check_stage_two(self) -> None:
        _check_positive_int("num_samples", self.num_samples)
        _check_positive_int("seq_len", self.seq_len, optional=True)
        _check_positive_int("epochs", self.epochs)
        _check_positive_int("batch_size", self.batch_size)
        for name in ("lr", "clip_lr", "damp"):
            _check_nonneg_float(name, getattr(self, name))
        _check_type("act_order", self.act_order, bool)
        _check_type("true_sequential", self.true_sequential, bool)
        _check_positive_int("loss_samples", self.loss_samples, optional=True)
        if self.input_mode is InputMode.CORRECTED and self.rounding is not Rounding.GPTQ:
            raise ValueError(f"input_mode='corrected' corrects GPTQ's targets: it needs rounding='gptq', got "
                             f"rounding={self.rounding.value!r}")
        _check_type("seed", self.seed, int)
        _check_type("cache_dir", self.cache_dir, str, optional=True)
        if self.cache_dir is not None and not self.cache_dir.strip():
            raise ValueError("cache_dir must be a folder path or None (no cache), got an empty string")
        if self.batch_size > self.num_samples:
            raise ValueError(
                f"batch_size ({self.batch_size}) must not exceed num_samples ({self.num_samples})"
            )
        if self.window is not None and self.seq_len is not None:
            check_window(self.window, self.seq_len)
        if not (self.dataset is None or isinstance(self.dataset, str) or _is_text_list(self.dataset)
                or hasattr(self.dataset, "column_names")):
            raise ValueError(
                "dataset must be a name ('wiki', 'wiki-val', 'lee' or a Hub dataset), a list of strings "
                f"or a datasets.Dataset, got {type(self.dataset).__name__}"
            )

    def _check_other(self) -> None:
        if isinstance(self.tokenizer, (int, float, bytes, list, tuple, dict)):  # not an object nor a path
            raise ValueError(f"tokenizer must be a tokenizer object or its path, got {self.tokenizer!r}")
        if self.modules_to_not_convert is not None:
            if not _is_text_list(self.modules_to_not_convert):
                raise ValueError(
                    f"modules_to_not_convert must be a list of module names, got {self.modules_to_not_convert!r}"
                )
        _check_type("push_to_hub", self.push_to_hub, str, optional=True)
        _check_type("version", self.version, int)
        if self.version < 1:
            raise ValueError(f"version must be a format version >= 1, got {self.version}")
        if self.version > CONFIG_VERSION:
            raise ValueError(
                f"version {self.version} is newer than this optimum-fair understands ({CONFIG_VERSION}); upgrade"
            )

    # -- derived values ---------------------------------------------------------------------
    def resolved_seq_len(self, model_max: int | None) -> int:
        """seq_len, or min(1024, the model's maximum length) when unset."""
        if self.seq_len is not None:
            if model_max is not None and self.seq_len > model_max:
                raise ValueError(f"seq_len ({self.seq_len}) exceeds the model's maximum length ({model_max})")
            return self.seq_len
        return min(1024, model_max) if model_max else 1024

    def resolved_window(self, seq_len: int) -> int:
        """K: window, or seq_len // 4 (the paper's 256 / 1024), rounded down to a multiple of block_length
        when that is set or when it is at least 32 (at least 1, and always below seq_len)."""
        if self.window is not None:
            return self.window
        window = max(1, seq_len // 4)
        block = self.block_length or (32 if window >= 32 else None)
        if block is not None:
            if window < block:
                raise ValueError(f"block_length ({block}) does not fit the default window seq_len // 4 = {window} "
                                 f"(seq_len {seq_len}): lower block_length or set window")
            window = window // block * block
        return window

    def resolved_block_length(self, window: int) -> int:
        """block_length, or the largest divisor of the window that is at most 32."""
        if self.block_length is not None:
            return self.block_length
        return next(d for d in range(min(32, window), 0, -1) if window % d == 0)

    # -- serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict: enums as strings; a tokenizer as its Hub id; in-memory data and machine-local
        settings (`cache_dir`, `prior`, a local tokenizer path) as None."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Enum):
                value = value.value
            elif f.name in _LOCAL_FIELDS:
                value = None
            elif f.name == "tokenizer" and value is not None:
                name = value if isinstance(value, str) else getattr(value, "name_or_path", None)
                value = name if is_repo_id(name) else None  # a local path is this machine's
            elif f.name == "dataset" and value is not None and not isinstance(value, str):
                value = None  # a list of texts or a Dataset is not written into config.json
            elif isinstance(value, list):
                value = list(value)
            out[f.name] = value
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs):
        """Inverse of `to_dict`. Unknown keys raise ValueError naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config_dict) - known)
        if unknown:
            raise ValueError(f"Unknown FairCalibConfig field(s) {unknown}; accepted fields: {sorted(known)}")
        if config_dict.get("version") == 1 and "weight_grid" not in config_dict:  # written before the field
            config_dict = {**config_dict, "weight_grid": WeightGrid.SYMMETRIC}
        local = sorted(k for k in _LOCAL_FIELDS if config_dict.get(k) is not None)
        if local:  # written by an older version: the publisher's folders, not this run's
            logger.warning("FairCalibConfig.from_dict: ignoring the machine-local %s of a saved config (%s); "
                           "set them on the config to use them", ", ".join(local),
                           ", ".join(f"{k}={config_dict[k]!r}" for k in local))
            config_dict = {**config_dict, **dict.fromkeys(local)}
        config = cls(**config_dict)
        unused = {k: v for k, v in kwargs.items() if k not in known}
        for key, value in kwargs.items():
            if key in known:
                setattr(config, key, value)
        if kwargs:
            config.__post_init__()
        return (config, unused) if return_unused_kwargs else config

    def get_loading_attributes(self) -> dict[str, Any]:
        return {}


# -- the decode rules: checked here on the values given, by the plan on the values resolved from the model --
def check_window(window: int, seq_len: int, limit: str = "") -> None:
    """The window K leaves at least one prompt token in seq_len (`limit`: what bounded seq_len, for the message)."""
    if window > seq_len - 1:
        raise ValueError(f"window ({window}) must leave at least one prompt token in seq_len ({seq_len}){limit}")


def check_steps(steps: int, window: int, block_length: int) -> None:
    """The steps T commit the same number of tokens in every block of the window."""
    if steps % (window // block_length):
        raise ValueError(f"steps ({steps}) must be a multiple of the number of blocks window // block_length = "
                         f"{window // block_length}")


def is_fair_calib(quantization_config: Any) -> bool:
    """Whether a model config's `quantization_config` (a dict from config.json, a config object or None)
    names this method."""
    if isinstance(quantization_config, dict):
        return quantization_config.get("quant_method") == "fair_calib"
    return getattr(quantization_config, "quant_method", None) == "fair_calib"


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, Enum) else value


def _check_type(name: str, value: Any, typ: type, optional: bool = False) -> None:
    if optional and value is None:
        return
    ok = isinstance(value, typ) and not (typ is int and isinstance(value, bool))
    if not ok:
        raise ValueError(f"{name} must be {typ.__name__}{' or None' if optional else ''}, got {value!r}")


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if isinstance(value, bool) or type(value) is not type(choices[0]) or value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def _check_positive_int(name: str, value: Any, optional: bool = False) -> None:
    _check_type(name, value, int, optional)
    if value is not None and value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value}")


def _check_nonneg_float(name: str, value: Any, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _is_text_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
