"""The lm-eval backend's model_args: parsed like lm-eval's HF backend (``pretrained=...,dtype=...,device=...``),
checked once, every error naming the bad argument. No lm-eval import here."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from ..enums import Algorithm, CacheMode, DreamAlg, LikelihoodEstimator, Remasking, coerce_enum
from ..eval.likelihood import check_mc_settings
from ..scoring.checks import check_nonneg, check_parallel_rule, check_positive_int

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


@dataclass
class LoadArgs:
    """What to load. pretrained: a folder, a Hub id or a model object (then tokenizer is needed, unless the
    model's folder holds one); dtype: float32 (default), bfloat16, float16 or auto (the checkpoint's)."""

    pretrained: Any = None
    tokenizer: Any = None
    dtype: Any = "float32"
    device: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False


@dataclass
class HarnessSettings:
    """How requests are scored and generated.

    mc_num: Monte-Carlo draws per loglikelihood request (128 in the released wrappers).
    batch_size: draws per forward for loglikelihood (mc_num must be a multiple); prompts per batch for
        generate_until.
    cfg: classifier-free guidance, logits = un + (cfg + 1)(cond - un) (LLaDA's convention; 0 = off).
    estimator: llada or dream mask sampler (default: the architecture adapter's).
    sampling_eps: the dream sampler's lowest mask rate.
    seed: base seed; each request's masks are seeded by (seed, its context tokens, its target length).
    check_greedy: run LLaDA's greedy check for is_greedy (target_len forwards per request); False
        returns is_greedy = False, as the released wrapper recommends for the paper's tasks.
    max_length: token budget of one forward (default: the model config's); longer requests are cut from
        the left.
    eos_suffix: append the EOS token after the continuation as a visible, never-masked suffix (Dream's
        wrapper does).
    gen_length / steps / block_length: generation length, denoising steps (default gen_length), LLaDA block
        length (default gen_length: one block); a task's generation_kwargs may override all three.
    algorithm: llada or dream sampler (default: the adapter's); remasking: LLaDA's commit rule; alg:
        Dream's; temperature: 0 = greedy.
    threshold / factor: Fast-dLLM's parallel decoding rules for generate_until (issue 34; default: off, the
        fixed schedule); cache: its approximate KV cache, none / prefix / dual (LLaDA, Dream, LLaDA-MoE).
    mask_id: override the mask token id (default: the config's, via the adapter).
    """

    mc_num: int = 128
    batch_size: int = 32
    cfg: float = 0.0
    estimator: LikelihoodEstimator | None = None
    sampling_eps: float = 1e-3
    seed: int = 1234
    check_greedy: bool = False
    max_length: int | None = None
    eos_suffix: bool = False
    gen_length: int = 256
    steps: int | None = None
    block_length: int | None = None
    algorithm: Algorithm | None = None
    remasking: Remasking = Remasking.LOW_CONFIDENCE
    alg: DreamAlg = DreamAlg.ENTROPY
    temperature: float = 0.0
    threshold: float | None = None
    factor: float | None = None
    cache: CacheMode = CacheMode.NONE
    mask_id: int | None = None

    def __post_init__(self) -> None:
        check_mc_settings(self.mc_num, self.batch_size, self.cfg, self.sampling_eps)
        for name in ("gen_length", "steps", "block_length", "max_length"):
            if getattr(self, name) is not None:
                check_positive_int(getattr(self, name), name)
        if self.mask_id is not None and (isinstance(self.mask_id, bool) or not isinstance(self.mask_id, int)
                                         or self.mask_id < 0):
            raise ValueError(f"mask_id must be a non-negative int, got {self.mask_id!r}")
        check_nonneg(self.temperature, "temperature")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        for name in ("check_greedy", "eos_suffix"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.estimator is not None:
            self.estimator = coerce_enum(LikelihoodEstimator, self.estimator, "estimator")
        if self.algorithm is not None:
            self.algorithm = coerce_enum(Algorithm, self.algorithm, "algorithm")
        self.remasking = coerce_enum(Remasking, self.remasking, "remasking")
        self.alg = coerce_enum(DreamAlg, self.alg, "alg")
        check_parallel_rule(self.threshold, self.factor)
        self.cache = coerce_enum(CacheMode, self.cache, "cache")


# passed by lm-eval's simple_evaluate to every backend; "auto" batch sizes are refused below
_LM_EVAL_EXTRAS = ("max_batch_size",)


def _names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def parse_model_args(args: dict[str, Any]) -> tuple[LoadArgs, HarnessSettings]:
    """Split lm-eval's model_args (already typed by lm-eval's parser) into what to load and how to score.

    Unknown names raise ValueError listing the known ones; every value is checked here.
    """
    known = set(_names(LoadArgs)) | set(_names(HarnessSettings)) | set(_LM_EVAL_EXTRAS)
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"unknown model_args {unknown} for the optimum-fair backend; known: {sorted(known)}")
    args = dict(args)
    batch = args.get("batch_size")
    if isinstance(batch, str):
        if batch.startswith("auto"):
            raise ValueError(f"batch_size={batch!r}: automatic batch sizes are not supported; give an int "
                             "(draws per forward; mc_num must be a multiple of it)")
        if batch.isdigit():
            args["batch_size"] = int(batch)
    args.pop("max_batch_size", None)
    dtype = args.get("dtype", "float32")
    if isinstance(dtype, str) and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    load = LoadArgs(**{k: v for k, v in args.items() if k in _names(LoadArgs)})
    settings = HarnessSettings(**{k: v for k, v in args.items() if k in _names(HarnessSettings)})
    if load.pretrained is None:
        raise ValueError("model_args needs pretrained=<folder or Hub id> (or a model object)")
    return load, settings


def merge_model_args(arg_dict: dict[str, Any], additional: dict[str, Any] | None) -> dict[str, Any]:
    """lm-eval's model_args plus its extra config (batch_size, device from its own flags); a name given in
    model_args wins, so ``--model_args batch_size=8`` is not overridden by the CLI's default batch size."""
    extra = {k: v for k, v in (additional or {}).items() if v is not None and k not in arg_dict}
    return {**arg_dict, **extra}
