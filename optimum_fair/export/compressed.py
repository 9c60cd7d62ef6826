"""compressed-tensors for vLLM / SGLang: a calibrated model as a transformers folder that the
`compressed-tensors` package compresses and loads, with no optimum-fair layer inside.

W4A16 -> `pack-quantized` (int4 weights, per channel or per group), W8A8 -> `int-quantized` (int8
weights, dynamic per-token int8 activations), W4A8 -> `pack-quantized` weights with dynamic per-token
int8 activations. Each FairLinear becomes an nn.Linear holding codes * scale, compressed-tensors'
quantization scheme is attached with our scales (zero point 0) and its own compressor packs the
weights: it divides by the same scale and rounds, which gives back our codes exactly (the float
product is within half a code of them). Online transforms are refused: compressed-tensors would need
them as separate transform modules, which vLLM does not run for these schemes.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..nn import FairLinear
from ..pipeline.surgery import set_module
from .requires import require


def check_exportable(model: nn.Module) -> None:
    """Raise ValueError naming the first layer compressed-tensors cannot hold exactly."""
    for name, module in model.named_modules():
        if not isinstance(module, FairLinear):
            continue
        if module.has_online_transform:
            raise ValueError(f"{name}: has an online transform (Hadamard / Kronecker or smoothing); "
                             "compressed-tensors export needs transform='none'")
        if module.grid is not None:
            grid = module.grid.gguf_type.value if module.grid.gguf_type else "asymmetric, float mins"
            raise ValueError(f"{name}: calibrated in a GGUF grid ({grid}) that compressed-tensors cannot hold (its "
                             "zero points are integers); export it as GGUF, or calibrate with sym=True and no "
                             "gguf_type")
        if (module.w_bits, module.a_bits) not in ((4, 16), (8, 8), (4, 8)):
            raise ValueError(f"{name}: W{module.w_bits}A{module.a_bits} has no compressed-tensors scheme vLLM "
                             "runs (exported: W4A16, W8A8, W4A8)")


def quantization_config(model: nn.Module):
    """compressed-tensors' QuantizationConfig for the FairLinears of `model` (one format per model)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    layers = {n: m for n, m in model.named_modules() if isinstance(m, FairLinear)}
    formats = {(m.w_bits, m.a_bits, m.group_size) for m in layers.values()}
    if len(formats) != 1:
        raise ValueError(f"compressed-tensors export needs one format for every layer, found {sorted(formats)}")
    w_bits, a_bits, group_size = formats.pop()
    weights = QuantizationArgs(num_bits=w_bits, type="int", symmetric=True,
                               strategy="channel" if group_size == -1 else "group",
                               group_size=None if group_size == -1 else group_size)
    acts = None if a_bits >= 16 else QuantizationArgs(num_bits=a_bits, type="int", symmetric=True,
                                                     strategy="token", dynamic=True)
    scheme = QuantizationScheme(targets=sorted(layers), weights=weights, input_activations=acts)
    fmt = "pack-quantized" if w_bits == 4 else "int-quantized"
    return QuantizationConfig(config_groups={"group_0": scheme}, format=fmt, quantization_status="frozen"), fmt


def write_compressed(model: nn.Module, tokenizer: Any, out: str | Path) -> Path:
    """Write `model` as a compressed-tensors folder `out` (a fresh folder; the caller moves it into place).
    `export.export` has run `check_exportable` first."""
    require("compressed_tensors")
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import apply_quantization_config

    qconfig, fmt = quantization_config(model)
    plain = _with_float_linears(model)
    apply_quantization_config(plain, qconfig)
    for name, module in plain.named_modules():
        if name in qconfig.config_groups["group_0"].targets:
            fair = model.get_submodule(name)
            module.weight_scale.data.copy_(fair.weight_scale.to(module.weight_scale.dtype).reshape(
                module.weight_scale.shape))
            module.weight_zero_point.data.zero_()
    compressor = ModelCompressor.from_pretrained_model(plain, quantization_format=fmt)
    compressor.compress_model(plain)
    if hasattr(plain.config, "quantization_config"):  # ours: update_config writes compressed-tensors' own
        del plain.config.quantization_config
    out = Path(out)
    plain.save_pretrained(out)
    compressor.update_config(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def _with_float_linears(model: nn.Module) -> nn.Module:
    """A copy of `model` where every FairLinear is an nn.Linear holding codes * scale."""
    plain = copy.deepcopy(model)
    for name, module in list(plain.named_modules()):
        if not isinstance(module, FairLinear):
            continue
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                           dtype=module.weight_scale.dtype)
        with torch.no_grad():
            linear.weight.copy_(module.dequantized_weight())
            if module.bias is not None:
                linear.bias.copy_(module.bias)
        set_module(plain, name, linear)
    for attr in ("hf_quantizer", "is_quantized", "quantization_method"):
        if attr in plain.__dict__:
            delattr(plain, attr)
    return plain
