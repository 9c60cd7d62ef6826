"""The optional packages an export format needs, imported on use with an error that says how to get them."""

from __future__ import annotations

import importlib
from types import ModuleType


def require(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError:
        raise ImportError(f"exporting needs the {name} package: pip install 'optimum-fair[export]'") from None
