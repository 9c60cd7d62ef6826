"""optimum-fair: FAIR-Calib post-training quantization for diffusion LLMs.

Importing this package registers the `fair_calib` quantization method with transformers (and the
native LLaDA / Dream model types); nothing else happens at import time. The public names below load
lazily, so the pure-torch subpackages (`ops`, `nn`, `calib`, `scoring`, `metrics`) import even where
transformers is unavailable.
"""

from __future__ import annotations

import importlib
from pathlib import Path

__version__ = "0.1.0.dev0"

#: Local path of the small trained diffusion LM shipped with the package.
DEFAULT_MODEL = str(Path(__file__).parent / "assets" / "teacher")

_LAZY = {
    "FairCalibConfig": "config",
    "Rounding": "config",
    "Transform": "config",
    "Weighting": "config",
    "Reliability": "config",
    "BoostSchedule": "config",
    "InputMode": "config",
    "CalibInputs": "config",
    "FairLinear": "nn",
    "quantize": "pipeline",
    "generate": "generation",
    "DecodeTrace": "scoring.trace",
    "PositionPrior": "scoring.prior",
    "is_main_process": "distributed",
}

__all__ = ["DEFAULT_MODEL", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _register_if_possible() -> None:
    try:
        import transformers  # noqa: F401
    except ImportError:  # the math subpackages stay usable without transformers
        return
    from .registration import register

    register()


_register_if_possible()
