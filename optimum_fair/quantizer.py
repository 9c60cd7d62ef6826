"""`FairCalibHfQuantizer`: thin glue between transformers' `from_pretrained` and the pipeline.

* Loading a full-precision model with `quantization_config=FairCalibConfig(...)`: the weights load as
  usual, then `_process_model_after_weight_loading` runs `pipeline.quantize` (the FP model is the
  teacher) and the model comes back with FairLinear layers.
* Loading a checkpoint saved by optimum-fair (`quantization_config` in its config.json): FairLinear
  skeletons replace the linears on the meta device before loading, the packed tensors load into them,
  and nothing is calibrated.
"""

from __future__ import annotations

import logging

from transformers.quantizers import HfQuantizer

from .config import FairCalibConfig

logger = logging.getLogger(__name__)


class FairCalibHfQuantizer(HfQuantizer):
    """transformers quantizer for `quant_method="fair_calib"`."""

    requires_calibration = False
    quantization_config: FairCalibConfig

    def __init__(self, quantization_config: FairCalibConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)

    def validate_environment(self, *args, **kwargs) -> None:
        if not isinstance(self.quantization_config, FairCalibConfig):
            raise ValueError(
                f"quantization_config must be a FairCalibConfig, got {type(self.quantization_config).__name__}"
            )

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        return False  # weights load as they are; calibration happens after loading

    def _process_model_before_weight_loading(self, model, **kwargs):
        if self.pre_quantized:
            from .convert import replace_with_skeletons
            from .pipeline import layer_format, resolve_skip

            skip = resolve_skip(model, self.quantization_config)
            dtype = kwargs.get("dtype") or model.config.dtype or None
            names = replace_with_skeletons(model, skip, layer_format(self.quantization_config), _dtype(dtype))
            logger.info("fair_calib: %d packed linears expected in the checkpoint", len(names))
            from .checkpoint import check_packed_tensors

            check_packed_tensors(model, kwargs.get("checkpoint_files"))
            self._checkpoint_files = kwargs.get("checkpoint_files")
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        if not self.pre_quantized:
            from .pipeline import quantize

            quantize(model, self.quantization_config)
            model.hf_quantizer = self
            self.pre_quantized = True  # the model in memory is now quantized
        else:  # a saved checkpoint: save_pretrained / push_to_hub keep writing the card (and the prior)
            from .hub import attach_hub_methods, load_saved_prior

            attach_hub_methods(model, reloaded=True)
            load_saved_prior(model, getattr(self, "_checkpoint_files", None))
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def _dtype(dtype):
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and hasattr(torch, dtype):
        return getattr(torch, dtype)
    return torch.float32
