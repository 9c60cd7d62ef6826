"""Resumable Stage II: each finished block is written to a cache directory.

`cache_dir/manifest.json` records a fingerprint of the run (config, model, calibration tokens, prior);
`cache_dir/block_XXXX.safetensors` holds one quantized block, with the same fingerprint in its metadata.
A run with the same fingerprint loads the finished blocks instead of recalibrating them; a different
fingerprint refuses to resume, naming what changed, so a cache can never leak into another run (also
when the manifest was lost: each block carries the fingerprint itself). Files are written to a temporary
name and renamed, so a kill leaves either the old file or the complete new one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..digests import tensor_digest
from ..files import atomic_path, atomic_write_text
from .plan import Plan
from .surgery import LayerFormat, set_module, skeleton

logger = logging.getLogger(__name__)


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 of every tensor of a state dict (names, dtypes, shapes and bytes), in name order."""
    h = hashlib.sha256()
    for name, t in sorted(state.items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class BlockCache:
    """Finished blocks of one calibration run."""

    def __init__(self, root: str | Path, fingerprint: dict, fmt: LayerFormat,
                 formats: Callable[[int, dict[str, nn.Module]], dict[str, LayerFormat]] | None = None):
        """formats(index, linears): each linear's format in block `index` (a GGUF mix varies it per layer);
        default: `fmt` for all."""
        self.root = Path(root)
        self.fingerprint = fingerprint
        self.formats = formats or (lambda index, linears: {name: fmt for name in linears})
        make_folder(self.root)
        check_access(self.root)
        manifest = self.root / "manifest.json"
        self.key = _json_digest(fingerprint)  # written into every block's metadata
        self.vouched = manifest.exists()  # blocks of an older version (no fingerprint) count only under it
        if manifest.exists():
            old = _read_manifest(manifest)
            changed = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
            if changed:
                raise ValueError(
                    f"cache_dir {self.root} holds a run with different {', '.join(changed)}; "
                    "refusing to resume from it (use another cache_dir or delete this one)"
                )
            logger.info("resuming from %s", self.root)
        else:
            if self.finished():
                logger.warning("cache_dir %s has blocks but no manifest.json: only blocks written under this run's "
                               "fingerprint will be reused", self.root)
            atomic_write_text(manifest, json.dumps({"fingerprint": fingerprint}, indent=2, sort_keys=True))

    def path(self, index: int) -> Path:
        return self.root / f"block_{index:04d}.safetensors"

    def load(self, index: int, block: nn.Module, teacher: str) -> bool:
        """Load block `index` into `block` (swapping its linears for FairLinears) if it is cached.

        teacher: `state_digest` of the full-precision block; a cached block calibrated from other weights
        is refused. A file that cannot be read, whose tensors do not match their recorded digest, or that
        holds non-finite values is reported and recalibrated (False), never loaded.
        """
        path = self.path(index)
        if not path.exists():
            return False
        state, meta = self._read(path)
        if state is None:
            return False
        if meta.get("fingerprint") != self.key and not (self.vouched and "fingerprint" not in meta):
            raise ValueError(f"{path}: block {index} was written by a run with another config, model, calibration "
                             "data or prior (its fingerprint differs from this run's); refusing to resume from it "
                             f"(use another cache_dir or delete {self.root})")
        if meta.get("teacher") != teacher:
            raise ValueError(f"{path}: block {index} was calibrated from other full-precision weights than this "
                             f"model's; refusing to resume (use another cache_dir or delete this one)")
        try:
            self._swap_in(block, state, index)
        except (KeyError, IndexError, AttributeError, RuntimeError, ValueError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ValueError(f"{path}: block {index} does not fit this model's block ({first}); the file was made "
                             f"by another version or edited: delete {self.root} (or this file) and rerun") from None
        return True

    def _swap_in(self, block: nn.Module, state: dict[str, torch.Tensor], index: int) -> None:
        """Swap the block's linears named in `state` for FairLinear skeletons and load `state` into it."""
        device = next(block.parameters()).device
        names = [k.removesuffix(".weight_scale") for k in state if k.endswith(".weight_scale")]  # its FairLinears
        linears = {name: block.get_submodule(name) for name in names}
        for name, fmt in self.formats(index, linears).items():
            dtype = state[f"{name}.weight_scale"].dtype if fmt.block_grid is None else linears[name].weight.dtype
            set_module(block, name, skeleton(linears[name], fmt, dtype).to(device))
        block.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=True)

    def save(self, index: int, block: nn.Module, teacher: str) -> None:
        """Write calibrated block `index` with the digests `load` checks (teacher: see `load`)."""
        state = {k: v.detach().cpu().contiguous() for k, v in block.state_dict().items()}
        with atomic_path(self.path(index)) as tmp:
            save_file(state, str(tmp), metadata={"teacher": teacher, "state": state_digest(state),
                                                 "fingerprint": self.key})

    @staticmethod
    def _read(path: Path) -> tuple[dict[str, torch.Tensor] | None, dict]:
        """(state, metadata) of a cached block, or (None, {}) after a warning naming what is wrong."""
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError) as err:
            problem = f"cannot be read ({err})"
        else:
            bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
            if meta.get("state") != state_digest(state):
                problem = "does not match the digest recorded when it was written (corrupted or edited)"
            elif bad:
                problem = f"holds non-finite values in {bad[:3]}"
            else:
                return state, meta
        logger.warning("%s %s: calibrating this block again", path, problem)
        return None, {}

    def finished(self) -> int:
        return len(list(self.root.glob("block_*.safetensors")))


def make_folder(root: Path) -> None:
    """Create `root` (and its parents); NotADirectoryError naming the file where a folder was expected."""
    for folder in (root, *root.parents):
        if folder.exists():
            if not folder.is_dir():
                raise NotADirectoryError(f"cache_dir {root}: {folder} is a file, a folder was expected there")
            break
    root.mkdir(parents=True, exist_ok=True)


def check_access(root: Path) -> None:
    """PermissionError, before any work, when this user cannot write `root` or read one of its files (a cache
    shared between users; it was reported as a missing file, then failed on the rewrite)."""
    if not os.access(root, os.W_OK | os.X_OK):
        raise PermissionError(f"cache_dir {root} is not writable by this user: use another cache_dir, or ask "
                              "its owner to make it group-writable")
    for path in sorted(root.iterdir()):
        if path.is_file() and not os.access(path, os.R_OK):
            info = path.stat()
            raise PermissionError(f"{path} cannot be read by this user (mode {stat.S_IMODE(info.st_mode):04o}, owner "
                                  f"uid {info.st_uid}): use another cache_dir, or ask its owner to make it readable")


def run_fingerprint(model: nn.Module, plan: Plan, ids: torch.Tensor) -> dict:
    """What must match for a cached block to be reused (the prior follows from these, or from its file).

    compute_dtype counts as resolved on this machine ("auto" is bfloat16 on one CPU, float32 on another)."""
    cfg = dict(plan.settings, compute_dtype=str(plan.compute_dtype))
    model_cfg = {k: v for k, v in model.config.to_dict().items() if k not in ("quantization_config",)}
    first = next(p for p in model.parameters())
    return {
        "config": _json_digest(cfg),
        "model": _json_digest(model_cfg) + "-" + tensor_digest(first.float()[:8]),
        "data": tensor_digest(ids),
        "prior": _file_digest(plan.stage_one.prior) if plan.stage_one.prior else "computed",
    }


def settings_digest(settings: dict) -> int:
    """A plan's `settings` (what shapes the quantized model) as a 60-bit int (to compare across ranks)."""
    return int(_json_digest(settings)[:15], 16)


def _read_manifest(path: Path) -> dict:
    """The fingerprint recorded in manifest.json; a file that is not such JSON raises, naming it."""
    try:
        old = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} cannot be read as the cache manifest ({err}); delete {path.parent} (or use "
                         "another cache_dir) to calibrate from scratch") from None
    if not isinstance(old, dict) or not isinstance(old.get("fingerprint"), dict):
        raise ValueError(f"{path} holds no fingerprint of a run; delete {path.parent} (or use another cache_dir) "
                         "to calibrate from scratch")
    return old["fingerprint"]


def _json_digest(value: dict) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_digest(prior_dir: str) -> str:
    path = Path(prior_dir) / "prior.safetensors"
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else "missing"
