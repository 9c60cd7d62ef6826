"""The load path of an optimum-fair checkpoint: checks against the model expecting it, and its prior.

Every tensor the model holds must be in the checkpoint with the shape and dtype its FairLinear skeleton
expects; a file that is not readable safetensors is named. Each tensor is checked against the digest
recorded in the file's metadata (`digests`; older checkpoints have none and get the header checks only).

The Stage I prior travels inside the weights: the quantizer's save hook (`get_state_dict_and_metadata`)
adds its tensors under the reserved ``fair_prior.`` keys and its settings as the ``fair_prior`` metadata
entry (`prior_state`), so every save, push and Hub download carries it; `load_saved_prior` reads it back,
or, for an older checkpoint (weights without it), from the ``prior/`` folder beside them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from ..digests import check_digests
from ..nn import FairLinear
from ..pipeline.result import PRIOR_DIR
from ..scoring.prior import PositionPrior

logger = logging.getLogger(__name__)

_SAFETENSORS_DTYPES = {"U8": torch.uint8, "I8": torch.int8, "F16": torch.float16, "BF16": torch.bfloat16,
                       "F32": torch.float32, "I16": torch.int16, "I32": torch.int32, "F64": torch.float64}


def expected_tensors(model: nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
    """name -> (shape, dtype) for every persistent buffer of every FairLinear. dtype None = any float."""
    out = {}
    for prefix, module in model.named_modules(remove_duplicate=False):  # a shared layer under each name
        if not isinstance(module, FairLinear):
            continue
        for name, buf in module.named_buffers(recurse=False):
            if buf is None or name in module._non_persistent_buffers_set:
                continue
            dtype = buf.dtype if name == "weight" else None
            out[f"{prefix}.{name}"] = (tuple(buf.shape), dtype)
    return out


def check_packed_tensors(model: nn.Module, checkpoint_files: Iterable[str] | None, a_bits: int | None = None,
                         shared_from: str | None = None) -> None:
    """Raise ValueError naming the first tensor that is missing from the checkpoint (a packed one, or any
    other the model holds: embeddings, norms, the LM head unless tied) or a packed one of the wrong shape
    or dtype, and the file(s) read; or naming the file when it was saved with other activation bits than
    `a_bits` (the one format field no tensor shape shows). Names under `shared_from` (tied blocks, which
    take the calibrated blocks' modules after loading) need not be in the checkpoint."""
    files = [str(f) for f in (checkpoint_files or []) if str(f).endswith(".safetensors")]
    if not files:
        return
    found: dict[str, tuple[tuple[int, ...], str]] = {}
    metadata: dict[str, dict[str, str]] = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                metadata[file] = f.metadata() or {}
                for key in f.keys():
                    sl = f.get_slice(key)
                    found[key] = (tuple(sl.get_shape()), sl.get_dtype())
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{file}: not a readable safetensors file ({err})") from None
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})  # written once, under their source
    shared = (shared_from + ".") if shared_from else None
    missing = [n for n in model.state_dict() if n not in found and n not in tied
               and not (shared and n.startswith(shared))]
    if missing:
        raise ValueError(f"{missing[0]}: missing from the fair_calib checkpoint ({', '.join(files)})"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                         + "; loading it would leave random weights")
    for name, (shape, dtype) in expected_tensors(model).items():
        if name not in found:  # another name of a shared tensor (a tied block's), checked under that one
            continue
        got_shape, got_dtype = found[name]
        torch_dtype = _SAFETENSORS_DTYPES.get(got_dtype)
        if got_shape != shape:
            raise ValueError(f"{name}: expected shape {shape}, found {got_shape} in the checkpoint")
        if dtype is not None and torch_dtype != dtype:
            raise ValueError(f"{name}: expected packed codes of dtype {dtype}, found {got_dtype}")
        if dtype is None and not (torch_dtype and torch_dtype.is_floating_point):
            raise ValueError(f"{name}: expected a floating-point tensor, found {got_dtype}")

    for file in files:
        if a_bits is not None:
            check_a_bits(file, metadata[file], a_bits)
        check_digests(file)


A_BITS_KEY = "fair_a_bits"


def format_metadata(a_bits: int) -> dict[str, str]:
    """The safetensors metadata entry recording the activation bits the packed layers were saved with."""
    return {A_BITS_KEY: str(a_bits)}


def check_a_bits(file: str, metadata: dict[str, str], a_bits: int) -> None:
    """Raise ValueError when `file` (its safetensors `metadata`) records other activation bits than `a_bits`."""
    recorded = metadata.get(A_BITS_KEY)
    if recorded is not None and recorded != str(a_bits):
        raise ValueError(f"{file}: its layers were saved with a_bits={recorded}, but config.json says "
                         f"a_bits={a_bits} (was the config edited?)")


def check_scales(model: nn.Module, signed: bool = False) -> None:
    """Raise ValueError naming the first FairLinear whose weight scales are not finite and positive
    (`signed`: nonzero; the searched grid stores negative ones, the group's extreme on the code -2^(b-1))."""
    for name, module in model.named_modules():
        if isinstance(module, FairLinear):
            scale = module.weight_scale
            if scale.is_meta:  # offloaded by accelerate: its values are not in memory, so not checked
                continue
            if not bool(torch.isfinite(scale).all()) or not bool((scale != 0 if signed else scale > 0).all()):
                want, bad = ("nonzero", "zero") if signed else ("positive", "zero, negative")
                raise ValueError(f"{name}.weight_scale: scales must be finite and {want}, the checkpoint "
                                 f"holds {bad}, inf or NaN ones")


PRIOR_PREFIX = "fair_prior."  # the reserved state-dict keys of the prior: fair_prior.weights, ...
PRIOR_KEY = "fair_prior"  # the safetensors metadata entry: its window, floor, length and decode settings
PRIOR_KEYS_PATTERN = r"(^|\.)fair_prior\."  # transformers' unexpected-key filter (no module holds them)


def prior_state(prior: PositionPrior | None) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The prior as extra state-dict tensors (``fair_prior.weights``, and the rollout statistics when
    known) and one safetensors metadata entry (JSON: window, floor, seq_len, settings); empty for None."""
    if prior is None:
        return {}, {}
    tensors = {"weights": prior.weights.float()}
    if prior.commit_step is not None:
        tensors.update(commit_step=prior.commit_step.long(), reliability_sum=prior.reliability_sum.float())
    meta = {"window": prior.window, "floor": prior.floor, "seq_len": prior.seq_len, "settings": prior.settings}
    return ({PRIOR_PREFIX + k: v.detach().contiguous() for k, v in tensors.items()},
            {PRIOR_KEY: json.dumps(meta, sort_keys=True)})


def load_saved_prior(checkpoint_files: list[str] | None) -> PositionPrior | None:
    """The prior a checkpoint carries: in its weights (`prior_state`, any shard), else in the ``prior/``
    folder beside an older local checkpoint. A prior that cannot be read is named in a warning and the
    model loads without it (inference does not use it)."""
    files = [str(f) for f in (checkpoint_files or []) if str(f).endswith(".safetensors")]
    if not files:
        return None
    try:
        prior = _prior_in_weights(files)
    except (ValueError, KeyError, TypeError, SafetensorError) as err:  # JSONDecodeError is a ValueError
        _cannot_read(f"the {PRIOR_PREFIX}* tensors of {Path(files[0]).parent}", err)
        return None
    return prior if prior is not None else _prior_in_folder(Path(files[0]).parent / PRIOR_DIR)


def _prior_in_weights(files: list[str]) -> PositionPrior | None:
    """The prior from the reserved tensors and metadata of `files` (None when they hold none)."""
    tensors: dict[str, Tensor] = {}
    meta = None
    for file in files:
        with safe_open(file, framework="pt") as f:
            meta = meta or (f.metadata() or {}).get(PRIOR_KEY)
            tensors.update({k[len(PRIOR_PREFIX):]: f.get_tensor(k) for k in f.keys() if k.startswith(PRIOR_PREFIX)})
    if not tensors and meta is None:
        return None
    if meta is None or "weights" not in tensors:
        raise ValueError(f"{PRIOR_PREFIX}weights or the {PRIOR_KEY!r} metadata is missing")
    meta = json.loads(meta)
    weights, commit, rel = tensors["weights"], tensors.get("commit_step"), tensors.get("reliability_sum")
    if weights.shape != (meta["seq_len"],):
        raise ValueError(f"weights have shape {tuple(weights.shape)}, the metadata says {meta['seq_len']}")
    if commit is not None and (rel is None or commit.shape != rel.shape or commit.shape[-1] != meta["window"]):
        raise ValueError(f"rollout statistics must both be (probes, window={meta['window']})")
    return PositionPrior(weights, int(meta["window"]), float(meta["floor"]), meta.get("settings", {}), commit, rel)


def _prior_in_folder(folder: Path) -> PositionPrior | None:
    """The prior in the ``prior/`` folder an older checkpoint has beside its weights (a Hub download of one
    fetches only the weights and config, so there it stays in the repo)."""
    if not (folder / "prior.json").is_file():
        return None
    try:
        return PositionPrior.load(folder)
    except (ValueError, KeyError, TypeError, OSError, SafetensorError) as err:  # JSONDecodeError is a ValueError
        _cannot_read(str(folder), err)
        return None


def _cannot_read(what: str, err: Exception) -> None:
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    logger.warning("%s cannot be read as the Stage I prior (%s): the model loads without it (inference does not "
                   "use it), and a re-save or push will not include it", what, first)
