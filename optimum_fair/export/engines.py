"""`export(model_or_dir, out, format)`: a calibrated model in a format another engine loads.

    gguf                one .gguf file for llama.cpp (`gguf_file`)
    compressed-tensors  a transformers folder for vLLM / SGLang (`compressed`)

Everything that can be checked (the format, the output path, the folder, each layer) is checked before
anything is written; the output appears only complete (assembled in a temporary folder beside it, renamed
at the end). The output path is resolved once (`files.output_path`): "", the input folder, the current
folder and any folder holding one of them are refused. Only `out` itself is ever replaced, and only with
`overwrite`, checked again at the moment of the swap: a file by a file, a folder by a folder when it is
empty or an earlier compressed-tensors export. The replaced entry is moved aside first and removed only
once the new one is in place.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from torch import nn

from ..data import resolve_tokenizer
from ..files import atomic_dir, new_parents, output_path
from ..nn import FairLinear
from . import compressed, gguf_file, gguf_types
from .folder import check_output_dir

logger = logging.getLogger(__name__)

FORMATS = ("gguf", "compressed-tensors")


def export(model_or_dir: nn.Module | str | os.PathLike, out: str | os.PathLike, format: str,
           tokenizer: Any = None, overwrite: bool = False, gguf_type: str | None = None) -> Path:
    """Write the calibrated model (in memory, or a folder saved by optimum-fair) to `out` as `format`.

    tokenizer: defaults to the folder's own (or, for a model in memory, the one it was calibrated with,
    else its source folder or Hub repo). GGUF needs one; a compressed-tensors folder is written without
    one when there is none. gguf_type (GGUF only): a file type as `llama-quantize` names it, whose mix
    sets the embedding's and the head's types ("Q4_0", "Q8_0": the codes' own type; `gguf_types`), or
    "F32" / "F16" / "BF16" for an unquantized model; None: the codes as they are, every float tensor
    F32. Returns the path written (absolute).
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if gguf_type is not None:
        if format != "gguf":
            raise ValueError(f"gguf_type is a GGUF setting; format is {format!r}")
        gguf_type = gguf_types.mix_for(gguf_type).blocks  # ValueError naming the types, before anything is read
    source = None if isinstance(model_or_dir, nn.Module) else check_output_dir(model_or_dir)
    protected = [p for p in (source, _local_dir(model_or_dir), _local_dir(tokenizer)) if p is not None]
    target = output_path(out, tuple(protected))
    _check_replaceable(target, out, format, overwrite)
    quantized = gguf_type not in gguf_types.FLOATS
    model, tokenizer = _load(model_or_dir if source is None else source, tokenizer, format, quantized)
    if format == "gguf":
        _hint_the_calibrated_type(model, gguf_type)
        gguf_file.check_exportable(model, gguf_type)
        gguf_file.check_tokenizer(tokenizer)
        gguf_file.log_scale_rounding(model)
    else:
        compressed.check_exportable(model)
    with new_parents(target), atomic_dir(target) as tmp:
        staged = tmp / "new"
        if format == "gguf":
            gguf_file.write_gguf(model, tokenizer, staged, gguf_type)
        else:
            compressed.write_compressed(model, tokenizer, staged)
        _check_replaceable(target, out, format, overwrite)  # again: something may have appeared meanwhile
        if os.path.lexists(target):
            os.replace(target, tmp / "old")  # aside, removed with tmp once the new one is in place
        try:
            os.replace(staged, target)
        except OSError:
            if os.path.lexists(tmp / "old"):
                os.replace(tmp / "old", target)
            raise
    return target


def _hint_the_calibrated_type(model: nn.Module, gguf_type: Any) -> None:
    """A model calibrated for a GGUF type, exported without one, keeps its embedding and head F32: say how to
    get llama.cpp's layout (about half the file)."""
    calibrated = getattr(getattr(model.config, "quantization_config", None), "gguf_type", None)
    if gguf_type is None and calibrated is not None:
        name = getattr(calibrated, "value", calibrated)
        logger.warning("this model was calibrated for %s; without gguf_type (--type) its embedding and head are "
                       "written F32. gguf_type=%r writes llama.cpp's %s layout", name, name, name)


def _check_replaceable(target: Path, out: Any, format: str, overwrite: bool) -> None:
    """FileExistsError / IsADirectoryError unless `target` is free or may be replaced by a `format` export."""
    if not os.path.lexists(target):
        return
    if not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    is_dir = target.is_dir() and not target.is_symlink()
    if format == "gguf" and is_dir:
        raise IsADirectoryError(f"{out} is a folder: a GGUF export is one file; name the .gguf file to write")
    if format == "compressed-tensors" and not is_dir:
        raise FileExistsError(f"{out} is a file: a compressed-tensors export is a folder; name a folder")
    if is_dir and any(target.iterdir()) and not _is_compressed_export(target):
        raise FileExistsError(f"{out} holds files that are not a compressed-tensors export; overwrite replaces "
                              "only an earlier export: name a new folder")


def _is_compressed_export(folder: Path) -> bool:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    quant = config.get("quantization_config") if isinstance(config, dict) else None
    return isinstance(quant, dict) and quant.get("quant_method") == "compressed-tensors"


def _local_dir(thing: Any) -> Path | None:
    """The local folder a model / tokenizer (or its path) was loaded from, when there is one."""
    name = thing if isinstance(thing, (str, os.PathLike)) else getattr(thing, "name_or_path", None)
    return Path(name) if name and os.path.isdir(name) else None


def _load(model_or_dir, tokenizer, format: str, quantized: bool = True):
    """(model, tokenizer): the tokenizer given, the calibration's, else the one beside the model (or None).
    quantized: the model must hold FairLinear layers (every export but an unquantized GGUF)."""
    from transformers import AutoModel

    model = model_or_dir if isinstance(model_or_dir, nn.Module) else AutoModel.from_pretrained(model_or_dir)
    if quantized and not any(isinstance(m, FairLinear) for m in model.modules()):
        raise ValueError("the model has no FairLinear layers: quantize it with optimum-fair first (a float "
                         "model exports only as an unquantized GGUF: gguf_type F32 / F16 / BF16)")
    if tokenizer is None:
        tokenizer = getattr(getattr(model, "hf_quantizer", None), "tokenizer", None)
    if tokenizer is not None:
        return model, resolve_tokenizer(tokenizer, model)
    tokenizer = resolve_tokenizer(None, model, required=False)  # the model's folder, else its Hub repo
    if tokenizer is None:
        where = model_or_dir if isinstance(model_or_dir, (str, os.PathLike)) else "the model"
        why = f"none given, and {where} has no tokenizer files, no Hub repo and no calibration tokenizer"
        if format == "gguf":
            raise ValueError(f"GGUF export needs the tokenizer: {why}; pass tokenizer= (an object or a path)")
        logger.warning("compressed-tensors export without a tokenizer (%s): give vLLM --tokenizer", why)
    return model, tokenizer

