"""Registration with transformers: the `fair_calib` config and quantizer, and the native model types."""

from __future__ import annotations


def register() -> None:
    """Register everything with transformers. Safe to call more than once."""
    from transformers.quantizers.auto import (
        AUTO_QUANTIZATION_CONFIG_MAPPING,
        AUTO_QUANTIZER_MAPPING,
        register_quantization_config,
        register_quantizer,
    )

    from .config import FairCalibConfig
    from .quantizer import FairCalibHfQuantizer

    if "fair_calib" not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config("fair_calib")(FairCalibConfig)
    if "fair_calib" not in AUTO_QUANTIZER_MAPPING:
        register_quantizer("fair_calib")(FairCalibHfQuantizer)
    try:
        from .modeling import register_native_models
    except ImportError:  # native models not available in this build
        return
    register_native_models()
