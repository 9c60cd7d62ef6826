"""Names of models and repos: the one repo-id check, and the name published for a model.

A published file (model card, `prior/prior.json`, config.json) names the base model by its Hub id, or by
its folder name when it has none: never by an absolute path of the machine that quantized it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

_NAMESPACED = re.compile(r"^[^/]+/[^/]+$")


def check_repo_id(repo_id: str, what: str = "repo_id") -> str:
    """`repo_id` if it is a valid 'namespace/name' Hub id, else ValueError naming `what`."""
    if not isinstance(repo_id, str) or not _NAMESPACED.match(repo_id):
        raise ValueError(f"{what} {repo_id!r} is not a Hub repo id ('namespace/name')")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"{what} {repo_id!r} is not a valid Hub repo id ('namespace/name'): {err}") from None
    return repo_id


def is_repo_id(name: Any) -> bool:
    """True for a valid 'namespace/name' Hub id that is not also an existing local path."""
    if not isinstance(name, str) or os.path.exists(name):
        return False
    try:
        check_repo_id(name)
    except ValueError:
        return False
    return True


def source_name(model: Any) -> str | None:
    """Where `model` was loaded from: its ``name_or_path`` (a Hub id or a local path), or None."""
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "name_or_path", None)
    return str(name) if name else None


def public_name(name: str | os.PathLike | None) -> str | None:
    """A name safe to publish: a Hub id as it is, a local path reduced to its folder name."""
    if name is None or str(name) == "":
        return None
    name = str(name)
    return name if is_repo_id(name) else Path(name.rstrip("/\\")).name or None
