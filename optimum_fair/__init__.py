"""optimum-fair: FAIR-Calib post-training quantization for diffusion LLMs.

Importing this package registers the `fair_calib` quantization method with transformers (and the
native LLaDA / Dream model types); nothing else happens at import time.
"""

from __future__ import annotations

from pathlib import Path

from .config import BoostSchedule, FairCalibConfig, InputMode, Reliability, Rounding, Transform, Weighting
from .nn import FairLinear
from .pipeline import quantize
from .registration import register

__version__ = "0.1.0.dev0"

#: Local path of the small trained diffusion LM shipped with the package.
DEFAULT_MODEL = str(Path(__file__).parent / "assets" / "teacher")

register()

__all__ = [
    "DEFAULT_MODEL",
    "BoostSchedule",
    "FairCalibConfig",
    "FairLinear",
    "InputMode",
    "Reliability",
    "Rounding",
    "Transform",
    "Weighting",
    "quantize",
]
