"""The FAIR-Calib lifecycle: plan -> Stage I (prior) -> Stage II (block loop) -> packed layers.

`calibrate(model, config, texts, tokenizer)` runs it on a model in memory and returns a
`CalibrationResult`; `build_prior` runs Stage I alone. Nothing here touches files other than the resume
cache, or the Hub: saving and pushing are `export`'s, the transformers glue is `integrations`'.
"""

from .calibration import calibrate
from .result import CalibrationResult, calibration_result
from .stage1 import build_prior

__all__ = ["CalibrationResult", "build_prior", "calibrate", "calibration_result"]
