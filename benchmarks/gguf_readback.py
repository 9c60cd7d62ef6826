"""A GGUF file read back into a float LLaDA with the `gguf` package, and its size per weight: shared by
`export_roundtrip.py` and `gguf_vs_llamacpp.py`.

`gguf_readback(path, folder)` dequantizes every tensor with `gguf.quants.dequantize` (any type it knows:
F32 / F16 / BF16, Q4_0 ... Q8_0, the K-quants, the I-quants) and puts the q / k rows back from llama.cpp's
interleaved rotary order into transformers' rotate-half order. `file_bits` gives bits per weight of the
whole file, of the tensors' data and of each tensor group (block linears, token embedding, output head).
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import AutoConfig, AutoModel

from optimum_fair.export.gguf_file import rotary_permute

# tensor groups by GGUF name: the block linears, the token embedding, the output head, the rest (norms)
EMBEDDING, HEAD = "token_embd.weight", "output.weight"


def dequantized(tensor) -> torch.Tensor:
    """A GGUF tensor as float32, in numpy order (rows, cols), whatever its type."""
    return torch.from_numpy(np.array(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32))


def gguf_readback(gguf_path: Path, folder: Path):
    """A float LLaDA (the shape of `folder`'s config) holding the GGUF file's tensors as the gguf package
    dequantizes them."""
    config = AutoConfig.from_pretrained(folder)
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config  # a float LLaDA of the same shape
    model = AutoModel.from_config(config, dtype=torch.float32).eval()
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLADA, config.n_layers)
    tensors = {t.name: t for t in gguf.GGUFReader(str(gguf_path)).tensors}
    heads = {"q_proj": config.n_heads, "k_proj": config.n_kv_heads or config.n_heads}
    state = {}
    for name, param in model.state_dict().items():
        value = dequantized(tensors[names.get_name(name, try_suffixes=(".weight", ".bias"))]).reshape(param.shape)
        n_head = heads.get(name.rpartition(".")[0].rpartition(".")[2])
        if n_head:  # undo the interleaving: applying the permutation's inverse
            value = inverse_rotary(value, n_head)
        state[name] = value
    model.load_state_dict(state)
    assert torch.equal(rotary_permute(state["model.transformer.blocks.0.q_proj.weight"], config.n_heads),
                       dequantized(tensors["blk.0.attn_q.weight"]))
    return model


def inverse_rotary(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of `rotary_permute`: interleaved pairs (2i, 2i + 1) back to rotate-half (i, i + d/2)."""
    out = rows.shape[0]
    return rows.reshape(n_head, out // n_head // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def tensor_group(name: str) -> str:
    """"embedding", "head", "linear" (a 2-D block weight) or "other" (norms) of a GGUF tensor name."""
    if name == EMBEDDING:
        return "embedding"
    if name == HEAD:
        return "head"
    if name.startswith("blk.") and not name.endswith("_norm.weight"):
        return "linear"
    return "other"


def bits(num_bytes: int, weights: int) -> float:
    """Bits per weight: bytes * 8 / weights."""
    return 8 * num_bytes / weights


def file_bits(gguf_path: Path, num_params: int) -> dict:
    """Bits per weight of the file (its bytes over `num_params`, the model's parameter count), of the
    tensors' data only, and per tensor group (that group's data over its own weights), with the GGUF type
    of each group's tensors."""
    tensors = gguf.GGUFReader(str(gguf_path)).tensors
    out = {"file_bytes": Path(gguf_path).stat().st_size, "params": num_params,
           "data_bytes": sum(int(t.n_bytes) for t in tensors)}
    out["bpw_file"] = bits(out["file_bytes"], num_params)
    out["bpw_data"] = bits(out["data_bytes"], num_params)
    groups: dict[str, dict] = {}
    for t in tensors:
        g = groups.setdefault(tensor_group(t.name), {"bytes": 0, "weights": 0, "types": {}})
        g["bytes"] += int(t.n_bytes)
        g["weights"] += int(t.n_elements)
        g["types"][t.tensor_type.name] = g["types"].get(t.tensor_type.name, 0) + 1
    for name, g in groups.items():
        out[f"bpw_{name}"] = bits(g["bytes"], g["weights"])
        out[f"types_{name}"] = g["types"]
    return out
