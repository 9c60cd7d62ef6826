"""transformers glue: the `fair_calib` quantizer, its registration, and `quantize()`.

* `from_pretrained(fp_model, quantization_config=FairCalibConfig(...))`: the weights load as usual,
  then `_process_model_after_weight_loading` runs `quantize_loaded` (the FP model is the teacher) and
  the model comes back with FairLinear layers.
* `from_pretrained(folder_saved_by_optimum_fair)`: FairLinear skeletons replace the linears on the meta
  device before loading, the packed tensors load into them (checked first), nothing is calibrated.
* `quantize(model, config, texts, tokenizer)`: the same pipeline on a model already in memory.

Both end with `use_kernels(model)`: the packed layers compute on integer kernels where they can
(`optimum_fair.use_kernels(model, "reference")` goes back to the fake-quant path).

Either way the model ends with `model.hf_quantizer` (the attribute transformers gives every quantized
model) holding a `FairCalibHfQuantizer` whose `result` is the `CalibrationResult`.

`model.save_pretrained` / `model.push_to_hub` stay transformers' own: the quantizer's save hook
(`get_state_dict_and_metadata`) puts the Stage I prior into the weights (`checkpoint.prior_state`) and the
load hooks read it back, and the Hub tags are the model's own (`add_model_tags`). The tokenizer and the
full model card are written by the explicit API (`export.save_quantized`, `export.push_model`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)

from ..arch import find_adapter
from ..config import FairCalibConfig
from ..digests import digest_metadata
from ..distributed import is_main_process
from ..enums import InputMode, WeightGrid
from ..modeling import register_native_models
from ..nn import use_kernels
from ..pipeline.moe import prepare_tied_load, tie_blocks, unfuse_experts
from ..pipeline.plan import layer_format, resolve_skip
from ..pipeline.result import CalibrationResult
from ..pipeline.surgery import replace_with_skeletons
from .checkpoint import (
    PRIOR_KEYS_PATTERN,
    check_packed_tensors,
    check_scales,
    format_metadata,
    load_saved_prior,
    prior_state,
)

logger = logging.getLogger(__name__)

METHOD = "fair_calib"


class FairCalibHfQuantizer(HfQuantizer):
    """transformers quantizer for `quant_method="fair_calib"`; `result` is what calibration produced."""

    requires_calibration = False
    quantization_config: FairCalibConfig

    def __init__(self, quantization_config: FairCalibConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.result: CalibrationResult | None = None
        self.tokenizer: Any = None  # the calibration tokenizer (object or path): save_quantized's default
        self._checkpoint_files: list[str] | None = None

    def validate_environment(self, *args, **kwargs) -> None:
        if not isinstance(self.quantization_config, FairCalibConfig):
            raise ValueError(
                f"quantization_config must be a FairCalibConfig, got {type(self.quantization_config).__name__}"
            )

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        return False  # weights load as they are; calibration happens after loading

    def _process_model_before_weight_loading(self, model, **kwargs):
        if self.pre_quantized:
            adapter = find_adapter(model)
            unfuse_experts(model, adapter, with_tied=True)  # fused experts were saved as linears
            skip = resolve_skip(model, self.quantization_config)
            dtype = _dtype(kwargs.get("dtype") or model.config.dtype)
            names = replace_with_skeletons(model, skip, layer_format(self.quantization_config), dtype)
            tied = adapter.tied_blocks if adapter is not None else None
            if tied:  # written once, under the calibrated blocks: shared again after loading
                prepare_tied_load(model, adapter)
            logger.info("fair_calib: %d packed linears expected in the checkpoint", len(names))
            self._checkpoint_files = kwargs.get("checkpoint_files")
            check_packed_tensors(model, self._checkpoint_files, a_bits=self.quantization_config.a_bits,
                                 shared_from=tied)
            # the prior's tensors belong to no module: read after loading (below), not reported as unexpected
            # (transformers' own quantizers extend this per-instance set the same way)
            model._keys_to_ignore_on_load_unexpected = {*(model._keys_to_ignore_on_load_unexpected or ()),
                                                        PRIOR_KEYS_PATTERN}
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        if self.pre_quantized:  # a saved checkpoint: keep its prior so a re-save or push writes it again
            config = self.quantization_config
            skip = list(config.modules_to_not_convert or [])
            adapter = find_adapter(model)
            if adapter is not None:
                tie_blocks(model, adapter)
            check_scales(model, signed=self.quantization_config.weight_grid is WeightGrid.SEARCH)
            self.result = CalibrationResult(config, skip, prior=load_saved_prior(self._checkpoint_files),
                                            reloaded=True)
            model.add_model_tags(hub_tags(model, config))
            use_kernels(model)
            return model
        quantize_loaded(model, self, texts=None, tokenizer=None)
        return model

    def get_state_dict_and_metadata(self, model):
        """transformers' save hook (`save_pretrained`, hence `push_to_hub`): the state dict plus the Stage I
        prior's tensors under the reserved ``fair_prior.`` keys; the metadata records every tensor's digest,
        the activation bits (checked when the checkpoint is loaded, see `integrations.checkpoint`) and the
        prior's settings. transformers writes the metadata into every shard."""
        tensors, prior_meta = prior_state(self.result.prior if self.result is not None else None)
        state = {**model.state_dict(), **tensors}
        metadata = {**digest_metadata(state), **format_metadata(self.quantization_config.a_bits), **prior_meta}
        return state, metadata

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def quantize(model: nn.Module, config: FairCalibConfig, texts=None, tokenizer=None) -> nn.Module:
    """Quantize `model` in place with FAIR-Calib and return it.

    The model's full-precision weights are the teacher: Stage I rolls it out to build the position
    prior, Stage II calibrates its blocks one at a time against its own hidden states. Afterwards
    `calibration_result(model)` holds the prior and per-block losses; `model.save_pretrained` /
    `model.push_to_hub` (transformers' own) write the packed weights, config and prior, and
    `optimum_fair.save_quantized` / `export.push_model` the complete folder (plus tokenizer and model card).

    Args:
        model: a transformers model (LLaDA, Dream, or a Llama-like model for the weight-only parts).
        config: the `FairCalibConfig`.
        texts: calibration text (a list of strings, a `datasets.Dataset` or a dataset name);
            defaults to `config.dataset`. Unused by round-to-nearest without transforms.
        tokenizer: tokenizer (or its path) for `texts`; defaults to `config.tokenizer`, then to
            the model's own directory.
    """
    if not isinstance(config, FairCalibConfig):
        raise ValueError(f"config must be a FairCalibConfig, got {type(config).__name__}")
    quantizer = FairCalibHfQuantizer(config, pre_quantized=False)
    model.hf_quantizer = quantizer  # as from_pretrained does before its post-processing
    model.is_quantized = True
    model.quantization_method = METHOD
    quantize_loaded(model, quantizer, texts, tokenizer)
    return model


def quantize_loaded(model: nn.Module, quantizer: FairCalibHfQuantizer, texts, tokenizer) -> None:
    """Calibrate `model` for `quantizer` (the one entry both paths share), then record and publish."""
    # the calibration path (datasets, pyarrow) and the Hub push load here, on first use: registering the
    # quantizer and loading a checkpoint import neither
    from ..export.hub import push_model, require_token
    from ..pipeline.calibration import calibrate

    config = quantizer.quantization_config
    if config.push_to_hub:  # no token or a bad repo id: fail before calibrating
        require_token(repo_id=config.push_to_hub)
    with _given_back_on_failure(model, config):
        _fold_rotation(model, config)
        fp_embedding = _round_embedding_to_target(model, config)
        result = calibrate(model, config, texts, tokenizer, fp_embedding=fp_embedding)
    quantizer.result, quantizer.quantization_config = result, result.config
    quantizer.tokenizer = tokenizer if tokenizer is not None else config.tokenizer
    quantizer.pre_quantized = True  # the model in memory is now quantized
    model.config.quantization_config = result.config
    model.add_model_tags(hub_tags(model, result.config))
    use_kernels(model)  # calibration ran on the reference path; inference runs on the integer kernels
    if config.push_to_hub and is_main_process():  # data parallel: every rank holds this model, one pushes
        push_model(model, config.push_to_hub, quantizer.tokenizer, keep_on_failure=True)


@contextlib.contextmanager
def _given_back_on_failure(model: nn.Module, config: FairCalibConfig) -> Iterator[None]:
    """A copy of the float weights calibration changes besides the converted linears (the folded rotation:
    all of them; a GGUF target: the token embedding; input_mode "corrected": the LM head) until calibration
    ends: a failure puts them back (every tensor still in the model; calibration checks its input before it
    converts any layer)."""
    state = model.state_dict()
    changed = []
    if config.gguf_type is not None:
        changed.append(model.get_input_embeddings())
    if config.input_mode is InputMode.CORRECTED:
        changed.append(model.get_output_embeddings())
    weights = [m.weight for m in changed if m is not None]
    names = list(state) if config.fold_rotation else \
        [n for n, p in model.named_parameters() if any(p is w for w in weights)]
    saved = {n: state[n].detach().to("cpu", copy=True) for n in names}
    try:
        yield
    except BaseException:
        with torch.no_grad():
            for k, v in model.state_dict().items():
                if k in saved and saved[k].shape == v.shape:
                    v.copy_(saved[k])
        raise


def _fold_rotation(model: nn.Module, config: FairCalibConfig) -> None:
    """config.fold_rotation: the residual rotation folded into the weights (`calib.fold`) before Stage I."""
    if not config.fold_rotation:
        return
    from ..arch import get_adapter
    from ..calib.fold import fold_rotation, residual_rotation

    adapter, width = get_adapter(model), model.get_input_embeddings().weight.shape[1]
    blocks = list(adapter.block_list(model))
    Q = residual_rotation(width, torch.Generator().manual_seed(config.seed))  # (width, width)
    fold_rotation(model, blocks, [adapter.block_groups(b) for b in blocks], Q)
    logger.info("residual stream rotated (%d x %d, folded into the weights) before calibration", width, width)


def _round_embedding_to_target(model: nn.Module, config: FairCalibConfig) -> torch.Tensor | None:
    """For a GGUF target, the token embedding rounded to the target type first, as llama.cpp's mix stores
    it, so Stage II calibrates the blocks on the inputs the file will give them (on the shipped model
    this took the Q4_0 mix's flip rate from 0.117 to 0.102, docs/export.md). Left float when tied to the
    LM head (llama.cpp then stores it in the head's type) or when its width is not a multiple of 32.
    Returns the float embedding it replaced under input_mode "corrected" (the FP stream starts from it),
    else None."""
    if config.gguf_type is None:
        return None
    from ..export import gguf_types  # torch only; loaded when a GGUF target is calibrated

    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if (head is not None and head.weight is embedding.weight) or embedding.weight.shape[1] % gguf_types.BLOCK:
        return None
    qtype = gguf_types.mix_for(config.gguf_type).embedding_type(embedding.weight.shape[1])
    fp = embedding.weight.detach().clone() if config.input_mode is InputMode.CORRECTED else None
    with torch.no_grad():
        embedding.weight.copy_(gguf_types.rounded(embedding.weight, qtype))
    logger.info("token embedding rounded to %s before calibration (the GGUF mix stores it so)", qtype.value)
    return fp


def hub_tags(model: nn.Module, config: FairCalibConfig) -> list[str]:
    """The Hub tags of a quantized model (transformers' push_to_hub puts the model's tags on its card; the
    full card, `export.card.build_card`, carries the same list)."""
    model_type = str(getattr(model.config, "model_type", "model")).lower()
    return ["fair-calib", f"w{config.w_bits}a{config.a_bits}", "diffusion-lm", model_type, "optimum-fair"]


def register() -> None:
    """Register the `fair_calib` config and quantizer and the native model types. Safe to call again."""
    if METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(METHOD)(FairCalibConfig)
    if METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(METHOD)(FairCalibHfQuantizer)
    register_native_models()


def _dtype(dtype: Any) -> torch.dtype:
    """A torch dtype from what from_pretrained passes (a dtype, its name, or None / "auto": float32)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
        return getattr(torch, dtype)
    return torch.float32
