"""Publishing a quantized model: the folder (`folder`), its model card (`card`), the Hub push (`hub`),
and formats other engines load (`engines`: GGUF, compressed-tensors).

The names below load lazily: `import optimum_fair` and loading a checkpoint import none of this.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "build_card": "card",
    "FORMATS": "engines",
    "export": "engines",
    "save_quantized": "folder",
    "HubPushError": "hub",
    "push_model": "hub",
    "push_quantized": "hub",
    "require_token": "hub",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
