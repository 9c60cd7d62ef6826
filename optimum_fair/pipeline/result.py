"""What calibration produced, as data: the exporters and the model card read this, nothing else.

    result = calibration_result(model)     # after quantize(...) or from_pretrained(quantized_folder)
    result.prior                           # PositionPrior or None (uniform weighting, RTN)
    result.blocks                          # [{"block": 0, "loss_rtn": ..., "loss": ..., "samples": 16}, ...]

The result travels with the model on its transformers quantizer (`model.hf_quantizer.result`), the
object transformers itself attaches to every quantized model; nothing else is set on the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..config import FairCalibConfig
from ..scoring.prior import PositionPrior

PRIOR_DIR = "prior"  # the folder of a saved checkpoint that holds `prior` (export writes it, loading reads it)


@dataclass
class CalibrationResult:
    """One calibration run (or a reloaded checkpoint) of one model.

    config: the config as run, `modules_to_not_convert` resolved (a copy: the caller's is untouched).
    skip: module names kept in floating point.
    prior: the Stage I position prior (None with uniform weighting or without calibration).
    blocks: per-block records {"block", "loss_rtn", "loss", "samples"} of Stage II (empty for RTN or a reload).
    base_model: the full-precision model's public name (Hub id, or folder name for a local model).
    reloaded: True for a checkpoint loaded back from disk (its name is the quantized repo, not the base).
    """

    config: FairCalibConfig
    skip: list[str]
    prior: PositionPrior | None = None
    blocks: list[dict[str, Any]] = field(default_factory=list)
    base_model: str | None = None
    reloaded: bool = False


def calibration_result(model: Any) -> CalibrationResult | None:
    """The `CalibrationResult` of a model quantized by optimum-fair, else None."""
    return getattr(getattr(model, "hf_quantizer", None), "result", None)
