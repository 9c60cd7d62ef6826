"""`export(model_or_dir, out, format)`: a calibrated model in a format another engine loads.

    gguf                one .gguf file for llama.cpp (`gguf_file`)
    compressed-tensors  a transformers folder for vLLM / SGLang (`compressed`)

Everything that can be checked (the format, the output path, the folder, each layer) is checked before
anything is written; the output appears only complete (temporary name, renamed at the end).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from torch import nn

from ..files import atomic_dir
from ..nn import FairLinear
from . import compressed, gguf_file
from .folder import check_output_dir

FORMATS = ("gguf", "compressed-tensors")


def export(model_or_dir: nn.Module | str | os.PathLike, out: str | os.PathLike, format: str,
           tokenizer: Any = None, overwrite: bool = False) -> Path:
    """Write the calibrated model (in memory, or a folder saved by optimum-fair) to `out` as `format`.

    tokenizer: defaults to the folder's own (or, for a model in memory, the one it was calibrated with,
    else its source folder). Returns the path written.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    model, tokenizer = _load(model_or_dir, tokenizer)
    if format == "gguf":
        gguf_file.check_exportable(model)
        gguf_file.check_tokenizer(tokenizer)
    else:
        compressed.check_exportable(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    if format == "gguf":
        return gguf_file.write_gguf(model, tokenizer, out)
    with atomic_dir(out) as tmp:
        compressed.write_compressed(model, tokenizer, tmp / "folder")
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp / "folder", out)
    return out


def _load(model_or_dir, tokenizer):
    from transformers import AutoModel, AutoTokenizer

    if isinstance(model_or_dir, nn.Module):
        model = model_or_dir
        if tokenizer is None:
            tokenizer = getattr(getattr(model, "hf_quantizer", None), "tokenizer", None) or model.name_or_path
    else:
        folder = check_output_dir(model_or_dir)
        model = AutoModel.from_pretrained(folder)
        tokenizer = tokenizer or folder
    if not any(isinstance(m, FairLinear) for m in model.modules()):
        raise ValueError("the model has no FairLinear layers: quantize it with optimum-fair first")
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    return model, tokenizer
