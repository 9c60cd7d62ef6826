"""The one tensor digest: sha256 of a tensor's dtype, shape and bytes, and its use in a safetensors file.

Checkpoints written by optimum-fair carry the digest of every tensor in their safetensors metadata
(`tensor_digests`, written through the quantizer's `get_state_dict_and_metadata`); loading and pushing
check each tensor against it, so a flipped byte in the data (which safetensors itself cannot see) fails
instead of loading different weights. The resume cache uses the same digest for its run fingerprint.
"""

from __future__ import annotations

import hashlib
import json

import torch
from safetensors import safe_open

DIGESTS_KEY = "tensor_digests"


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 (16 hex digits) of a tensor's dtype, shape and bytes."""
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def digest_metadata(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """The safetensors metadata entry recording every tensor's digest."""
    return {DIGESTS_KEY: json.dumps({k: tensor_digest(v) for k, v in sorted(state.items())})}


def check_digests(file: str) -> None:
    """Raise ValueError naming the file and tensor when a tensor differs from its recorded digest (a file
    written before digests existed has none and passes)."""
    with safe_open(file, framework="pt") as f:
        recorded = (f.metadata() or {}).get(DIGESTS_KEY)
        if recorded is None:
            return
        try:
            digests = json.loads(recorded)
        except json.JSONDecodeError:
            raise ValueError(f"{file}: its {DIGESTS_KEY} metadata is not JSON (the header was edited)") from None
        for key in f.keys():
            if key in digests and tensor_digest(f.get_tensor(key)) != digests[key]:
                raise ValueError(f"{file}: tensor {key} does not match the digest recorded when it was saved "
                                 "(the file is corrupted or was edited)")
