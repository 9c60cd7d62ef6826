"""The FAIR-Calib lifecycle: plan -> Stage I (prior) -> Stage II (block loop) -> packed layers.

`calibrate(model, config, texts, tokenizer)` runs it on a model in memory and returns a
`CalibrationResult`; `build_prior` runs Stage I alone. Nothing here touches files other than the resume
cache, or the Hub: saving and pushing are `export`'s, the transformers glue is `integrations`'.

The names below load lazily, so loading a checkpoint (which needs `surgery`, `moe`, `result`) does not
import the calibration path (`data`, hence `datasets` and `pyarrow`).
"""

from __future__ import annotations

import importlib

_LAZY = {
    "calibrate": "calibration",
    "CalibrationResult": "result",
    "calibration_result": "result",
    "build_prior": "stage1",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
