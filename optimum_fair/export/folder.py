"""A complete output folder for a quantized model, written so that an interrupted save leaves nothing
that looks complete.

    save_quantized(model, "out/llada-w4a4", tokenizer=tok, metrics={"FP": fp, "W4A4": q})

A folder holds ``save_pretrained``'s safetensors + config.json (the quantizer's save hook puts the
Stage I prior into the weights), the tokenizer, the prior again in ``prior/`` (readable on its own, for
`FairCalibConfig(prior=...)`) and a README.md model card (`card.build_card`). transformers'
``save_pretrained`` has no hook for extra files, so the tokenizer, ``prior/`` and the card are written
here. It is assembled in a temporary folder beside the target and moved into place at the end
(config.json last).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from ..config import is_fair_calib
from ..data import resolve_tokenizer
from ..distributed import is_main_process
from ..files import atomic_dir
from ..pipeline.result import PRIOR_DIR, CalibrationResult, calibration_result
from .card import build_card

logger = logging.getLogger(__name__)


def save_quantized(model: Any, output_dir: str | os.PathLike, tokenizer: Any = None,
                   metrics: dict[str, Any] | None = None, *, base_model: str | None = None,
                   repo_id: str | None = None, overwrite: bool = False, result: CalibrationResult | None = None,
                   **save_kwargs: Any) -> Path:
    """Write a complete folder: safetensors weights + config, tokenizer, ``prior/``, README.md.

    The folder is assembled beside ``output_dir`` and moved into place at the end. An existing
    non-empty ``output_dir`` raises FileExistsError (naming the other model it holds, if any: a
    full-precision teacher, another architecture or quantizer) unless ``overwrite`` (its files are then
    replaced, others kept). ``tokenizer`` defaults to the one the model was calibrated with, then to the
    model's own folder or repo. ``result`` defaults to the model's own `CalibrationResult`;
    ``save_kwargs`` go to ``save_pretrained`` (e.g. ``max_shard_size``)."""
    if not is_main_process():  # data-parallel runs: only rank 0 writes (no barrier: callers may guard too)
        return Path(output_dir)
    result = result if result is not None else calibration_result(model)
    card = build_card(model, metrics, base_model, repo_id, result)  # bad input fails before any write
    if tokenizer is None:  # the calibration tokenizer the quantizer kept, else the model's own (None)
        tokenizer = getattr(getattr(model, "hf_quantizer", None), "tokenizer", None)
    tokenizer = resolve_tokenizer(tokenizer, model, required=False)
    target = Path(output_dir)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"output_dir {target} exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        other = other_model_in(target, model)
        raise FileExistsError(f"output_dir {target}: {other}; refusing to write over it (pass overwrite=True to "
                              "replace its files)" if other else
                              f"output_dir {target} is not empty (pass overwrite=True to replace its files)")
    with atomic_dir(target, inside_ok=True) as tmp:  # a writable folder under a read-only parent
        model.save_pretrained(tmp, **save_kwargs)  # transformers' own: weights (with the prior) and config
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if result is not None and result.prior is not None:
            result.prior.save(tmp / PRIOR_DIR)
        card.save(tmp / "README.md")
        _move_into_place(tmp, target)
    logger.info("saved quantized model to %s", target)
    return target


def _move_into_place(tmp: Path, target: Path) -> None:
    """Move every entry of tmp into target (config.json last); drop target's stale weights and prior."""
    if not target.exists():
        tmp.rename(target)  # the whole folder appears at once
        return
    new = {p.name for p in tmp.iterdir()}
    for old in target.iterdir():
        stale_weights = old.name.startswith("model") and ".safetensors" in old.name and old.name not in new
        if stale_weights or (old.name == PRIOR_DIR and PRIOR_DIR not in new):
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    (target / "config.json").unlink(missing_ok=True)  # the folder does not look complete until the end
    for entry in sorted(tmp.iterdir(), key=lambda p: p.name == "config.json"):
        dest = target / entry.name
        if dest.is_dir():
            shutil.rmtree(dest)
        os.replace(entry, dest)


def other_model_in(folder: str | os.PathLike, model: Any) -> str | None:
    """Why `folder` holds a model other than a FAIR-Calib checkpoint of `model`'s type (None: it does not).

    A folder with no config.json holds no model; one whose config.json is not JSON, names another
    model_type or has no fair_calib quantization_config (a full-precision model, another quantizer's
    checkpoint) does."""
    config_file = Path(folder) / "config.json"
    if not config_file.is_file():
        return None
    there = _config_dict(config_file)
    if there is None:
        return f"{config_file} is not a JSON config"
    mine = getattr(model.config, "model_type", None)
    if there.get("model_type") != mine:
        return f"{config_file} is a {there.get('model_type')!r} model, this one is {mine!r}"
    if not is_fair_calib(there.get("quantization_config")):
        return f"{config_file} is not a FAIR-Calib checkpoint (a full-precision model or another quantizer's)"
    return None


def _config_dict(config_file: Path) -> dict | None:
    """The JSON object in `config_file`, or None when the file is not one."""
    try:
        there = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return there if isinstance(there, dict) else None


def check_output_dir(output_dir: str | os.PathLike) -> Path:
    """A folder written by `save_quantized`: config.json with a fair_calib quantization_config and weights."""
    path = Path(output_dir)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} has no config.json: expected a folder written by save_quantized")
    config = _config_dict(config_file)
    if config is None:
        raise ValueError(f"{config_file} is not a JSON config: expected a folder written by save_quantized")
    if not is_fair_calib(config.get("quantization_config")):
        raise ValueError(f"{config_file} has no fair_calib quantization_config: not an optimum-fair model")
    if not any(path.glob("*.safetensors")):
        raise FileNotFoundError(f"{path} has no .safetensors weights")
    return path
