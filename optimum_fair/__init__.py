"""optimum-fair: FAIR-Calib post-training quantization for diffusion LLMs.

Importing this package registers the `fair_calib` quantization method with transformers (and the
native LLaDA / Dream model types); nothing else happens at import time, and only what loading a
checkpoint needs is imported (not the calibration path, its datasets / pyarrow, the exporters or lm-eval:
`tests/test_lean_import.py`). The public names below load lazily, so the pure-torch subpackages (`ops`,
`nn`, `calib`, `scoring`, `eval.metrics`) import even where transformers is unavailable. A failure to
register (transformers installed but broken, a module shadowing one of its dependencies) raises here,
with its cause, instead of surfacing later as an "unknown architecture".
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

__version__ = "0.1.0.dev0"

#: Local path of the small trained diffusion LM shipped with the package.
DEFAULT_MODEL = str(Path(__file__).parent / "assets" / "teacher")

_LAZY = {
    "FairCalibConfig": "config",
    "Rounding": "enums",
    "Transform": "enums",
    "Weighting": "enums",
    "Reliability": "enums",
    "BoostSchedule": "enums",
    "InputMode": "enums",
    "CalibInputs": "enums",
    "WeightGrid": "enums",
    "FairLinear": "nn",
    "use_kernels": "nn",
    "reference_kernels": "nn",
    "quantize": "integrations.transformers",
    "build_prior": "pipeline",
    "CalibrationResult": "pipeline",
    "calibration_result": "pipeline",
    "save_quantized": "export",
    "push_quantized": "export",
    "evaluate": "eval.evaluate",
    "generate": "eval.generation",
    "DecodeTrace": "scoring.trace",
    "PositionPrior": "scoring.prior",
    "is_main_process": "distributed",
}

__all__ = ["DEFAULT_MODEL", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _register_if_possible() -> None:
    if importlib.util.find_spec("transformers") is None:  # the math subpackages stay usable without it
        return
    importlib.import_module(".integrations.transformers", __name__).register()


_register_if_possible()
