"""GGUF for llama.cpp: a calibrated LLaDA, LLaDA-MoE or Dream as one `.gguf` file, written with `gguf`.

The calibrated codes go in as they are, never re-quantized: a symmetric int4 code c in [-8, 7] with
scale s is GGUF `Q4_0` (blocks of 32: one fp16 `d`, 16 bytes of nibbles q, value (q - 8) d) with
q = c + 8 and d = s; int8 codes are `Q8_0` (one fp16 `d`, 32 int8 values). A per-channel scale repeats
in every block of its row. The weights are exact when the scales are fp16 (the model was calibrated
in fp16, as the shipped one loads); other scales are rounded to fp16, and the largest relative change
is logged. What GGUF cannot express is refused before anything is written: online transforms (Hadamard
/ learned Kronecker, smoothing), scale groups that are not multiples of 32, inputs not a multiple of
32. llama.cpp quantizes activations its own way, so activation bits are dropped (logged).

Tensor names come from `gguf`'s own name map for the architecture. For LLaDA the q / k rows are
permuted from transformers' rotate-half rotary layout to llama.cpp's interleaved one, as llama.cpp's
converter does; Dream (Qwen2 layout) and LLaDA-MoE run rotate-half rotary in llama.cpp and keep their
rows. LLaDA-MoE's experts are stacked per layer into llama.cpp's 3-D `ffn_{gate,up,down}_exps` tensors
(expert-major, each expert's Q4_0 / Q8_0 rows as they are); llama.cpp's `llada-moe` has no shared expert,
no dense layer and no router bias, so such configs are refused.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..enums import GGUFType
from ..files import atomic_path
from ..grids import BLOCK_BITS, K_GRIDS, SUPER_BLOCK
from ..naming import public_name
from ..nn import FairLinear
from .gguf_types import BLOCK, FILE_TYPES, FLOATS, Mix, block_types, encode, layer_blocks, layer_type, mix_for
from .requires import require

logger = logging.getLogger(__name__)

ARCHS = {"llada": "LLADA", "Dream": "DREAM", "lladamoe": "LLADA_MOE"}  # our model_type -> gguf.MODEL_ARCH
EXPERT = re.compile(r"(?P<layer>.*\.mlp\.experts)\.(?P<e>\d+)\.(?P<w>gate_proj|up_proj|down_proj)\.weight$")
PLAIN_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% endfor %}"  # the prompt as it is


def check_exportable(model: nn.Module, gguf_type: GGUFType | str | None = None) -> None:
    """Raise ValueError naming the first layer (or the architecture) GGUF cannot hold exactly, or that
    is not in the block type of `gguf_type` (F32 / F16 / BF16: a float model; Q4_0 / Q8_0: codes of that
    width)."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ARCHS:
        raise ValueError(f"GGUF export supports model_type {sorted(ARCHS)}, got {model_type!r}")
    if model_type == "lladamoe":
        _check_llada_moe(model.config)
    mix = None if gguf_type is None else mix_for(gguf_type)
    fair = [(name, m) for name, m in model.named_modules() if isinstance(m, FairLinear)]
    if mix is not None and (mix.blocks in FLOATS) != (not fair):
        raise ValueError(f"gguf_type={mix.blocks.value}: " + (
            f"a float type writes an unquantized model, but {fair[0][0]} holds codes (export the float model, or "
            "pass the type the codes are in)" if fair else "the model is not quantized: calibrate it with "
            f"FairCalibConfig(gguf_type={mix.blocks.value!r}) first, or export F32 / F16 / BF16 and run "
            "llama-quantize"))
    for name, module in fair:
        qtype = _layer_type(module)
        if qtype is None:
            raise ValueError(f"{name}: no GGUF type holds its codes (w_bits={module.w_bits}, group_size="
                             f"{module.group_size}{', asymmetric' if module.weight_min is not None else ''}; "
                             "GGUF holds 4 / 5 / 8-bit symmetric or 4 / 5-bit asymmetric codes in groups of 32)")
        if mix is not None and mix.blocks not in FLOATS and qtype not in block_types(mix):
            raise ValueError(f"{name}: gguf_type={mix.blocks.value} stores its block linears as "
                             f"{sorted(t.value for t in block_types(mix))}, this layer's codes are {qtype.value} "
                             f"(calibrate with FairCalibConfig(gguf_type={mix.blocks.value!r}))")
        if module.has_online_transform:
            raise ValueError(f"{name}: has an online transform (Hadamard / Kronecker or smoothing), which GGUF "
                             "cannot express; export configs with transform='none'")
        if qtype in K_GRIDS and module.in_features % SUPER_BLOCK:
            raise ValueError(f"{name}: {qtype.value} holds rows of a multiple of {SUPER_BLOCK} weights, in_features "
                             f"is {module.in_features}")
        if qtype not in K_GRIDS and (module.in_features % BLOCK or (module.group_size != -1
                                                                    and module.group_size % BLOCK)):
            raise ValueError(f"{name}: GGUF blocks hold {BLOCK} weights; in_features ({module.in_features}) and "
                             f"group_size ({module.group_size}) must be multiples of {BLOCK} (or per channel)")


def _check_llada_moe(cfg) -> None:
    """llama.cpp's llada-moe: every layer MoE, no shared expert, no router bias."""
    if not all(cfg.moe_layer_freq):
        raise ValueError(f"LLaDAMoEConfig.moe_layer_freq: GGUF (llama.cpp's llada-moe) needs every layer MoE, got "
                         f"{cfg.moe_layer_freq}")
    if cfg.shared_expert_intermediate_size:
        raise ValueError("LLaDAMoEConfig.shared_expert_intermediate_size: llama.cpp's llada-moe has no shared "
                         f"expert, got {cfg.shared_expert_intermediate_size}")
    if cfg.moe_router_enable_expert_bias:
        raise ValueError("LLaDAMoEConfig.moe_router_enable_expert_bias: llama.cpp's llada-moe has no router bias")


def check_tokenizer(tokenizer: Any) -> None:
    """Raise ValueError unless `tokenizer` is a byte-level BPE (llama.cpp's `gpt2` tokenizer model)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    kind = type(backend.model).__name__ if backend is not None else type(tokenizer).__name__
    if kind != "BPE":
        raise ValueError(f"GGUF export writes byte-level BPE tokenizers (llama.cpp's 'gpt2' model, with merges); "
                         f"this tokenizer is {kind}")


def rotary_permute(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder q / k rows (out, ...) from rotate-half pairs (i, i + d/2) to interleaved pairs (2i, 2i + 1)."""
    out = rows.shape[0]
    return rows.reshape(n_head, 2, out // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def write_gguf(model: nn.Module, tokenizer: Any, out: str | Path, gguf_type: GGUFType | str | None = None) -> Path:
    """Write `model` (a calibrated LLaDA or Dream) and `tokenizer` to the GGUF file `out`, atomically.

    gguf_type: the file type whose mix (`gguf_types.MIXES`) sets the embedding's and the head's types, or
    that of an unquantized model's matrices; None: every float tensor F32 (lossless). `export.export` has
    run `check_exportable` and `check_tokenizer` first."""
    gguf = require("gguf")
    cfg = model.config
    arch = getattr(gguf.MODEL_ARCH, ARCHS[cfg.model_type])
    dropped = sorted({m.a_bits for m in model.modules() if isinstance(m, FairLinear) and m.a_bits < 16})
    if dropped:
        logger.warning("GGUF keeps weights only: activation bits %s dropped (llama.cpp quantizes activations "
                       "its own way)", dropped)
    out = Path(out)
    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[arch])
        n_blocks = _write_hparams(writer, cfg)
        mix = None if gguf_type is None else mix_for(gguf_type)
        writer.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[_block_type(model, mix)]).value)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _write_vocab(writer, tokenizer, _vocab_size(cfg), cfg.mask_token_id, gguf)
        _write_tensors(writer, model, gguf.get_tensor_name_map(arch, n_blocks), gguf, mix)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return out


def hparams(cfg) -> dict:
    """The hyperparameters llama.cpp reads, from a LLaDA, LLaDA-MoE or Dream (Qwen2 names) config."""
    if cfg.model_type == "lladamoe":
        return dict(blocks=cfg.num_hidden_layers, width=cfg.hidden_size, ffn=cfg.dense_intermediate_size,
                    heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads,
                    context=cfg.max_position_embeddings, rope_theta=cfg.rope_theta_value, shift_logits=False,
                    rope_dims=cfg.rotary_dim, experts=cfg.num_experts, experts_used=cfg.num_experts_per_tok,
                    expert_ffn=cfg.expert_intermediate_size)
    if cfg.model_type == "llada":
        return dict(blocks=cfg.n_layers, width=cfg.d_model, ffn=cfg.mlp_hidden_size, heads=cfg.n_heads,
                    kv_heads=cfg.n_kv_heads or cfg.n_heads, context=cfg.max_sequence_length,
                    rope_theta=cfg.rope_theta, shift_logits=False)
    return dict(blocks=cfg.num_hidden_layers, width=cfg.hidden_size, ffn=cfg.intermediate_size,
                heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads,
                context=cfg.max_position_embeddings, rope_theta=cfg.rope_theta_value,
                shift_logits=True)  # Dream predicts the token after each position


def _write_hparams(writer, cfg) -> int:
    """The architecture's hyperparameters, as llama.cpp's converter writes them; returns the block count."""
    h = hparams(cfg)
    writer.add_name(public_name(getattr(cfg, "_name_or_path", None)) or "optimum-fair export")  # never a local path
    writer.add_context_length(h["context"])
    writer.add_embedding_length(h["width"])
    writer.add_block_count(h["blocks"])
    writer.add_feed_forward_length(h["ffn"])
    writer.add_head_count(h["heads"])
    writer.add_head_count_kv(h["kv_heads"])
    writer.add_rope_freq_base(h["rope_theta"])
    writer.add_rope_dimension_count(h.get("rope_dims", h["width"] // h["heads"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if "experts" in h:
        writer.add_expert_count(h["experts"])
        writer.add_expert_used_count(h["experts_used"])
        writer.add_expert_feed_forward_length(h["expert_ffn"])
    writer.add_vocab_size(_vocab_size(cfg))
    writer.add_causal_attention(False)  # diffusion: every position attends to every other
    writer.add_diffusion_shift_logits(h["shift_logits"])
    return h["blocks"]


def _vocab_size(cfg) -> int:
    return getattr(cfg, "embedding_size", None) or cfg.vocab_size


def _write_vocab(writer, tokenizer, size: int, mask_token_id: int, gguf) -> None:
    """Byte-level BPE as llama.cpp's `gpt2` tokenizer model: tokens by id, types, merges, special ids.

    Everything comes from the tokenizer object (its `tokenizers` backend for the merges), never from a
    folder: a tokenizer loaded by Hub id or built in memory has none, and the current folder is not its."""
    vocab = tokenizer.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    special = set(tokenizer.all_special_ids)
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(size)]
    types = [gguf.TokenType.UNUSED if i not in by_id else gguf.TokenType.CONTROL if i in special
             else gguf.TokenType.NORMAL for i in range(size)]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_add_bos_token(False)
    writer.add_token_merges(token_merges(tokenizer))
    ids = special_token_ids(tokenizer, size)
    if mask_token_id is not None:  # the model's own mask id (llama.cpp's diffusion example reads it)
        ids["mask"] = int(mask_token_id)
    for kind, token_id in ids.items():
        getattr(writer, f"add_{kind}_token_id")(token_id)
    # a base model has no chat format: llama.cpp's CLIs would wrap the prompt in a default one (chatml)
    writer.add_chat_template(getattr(tokenizer, "chat_template", None) or PLAIN_TEMPLATE)


def token_merges(tokenizer: Any) -> list[str]:
    """The BPE merges of `tokenizer`'s `tokenizers` backend as GGUF writes them ("a b"; a space inside a
    token as U+0120, as llama.cpp's converter does); ValueError when it has none."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = json.loads(backend.to_str()).get("model", {}) if backend is not None else {}
    merges = model.get("merges") or []
    if not merges:
        raise ValueError(f"the tokenizer ({type(tokenizer).__name__}, {getattr(tokenizer, 'name_or_path', '')!r}) "
                         "has no BPE merges: llama.cpp cannot load a 'gpt2' vocabulary without them")
    if isinstance(merges[0], str):
        return list(merges)
    return [" ".join(part.replace(" ", chr(ord(" ") + 256)) for part in pair) for pair in merges]


def special_token_ids(tokenizer: Any, size: int) -> dict[str, int]:
    """bos / eos / unk / sep / pad / cls / mask ids that the tokenizer sets and the vocabulary holds."""
    ids = {}
    for kind in ("bos", "eos", "unk", "sep", "pad", "cls", "mask"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if isinstance(token_id, int) and 0 <= token_id < size:
            ids[kind] = token_id
    return ids


def _block_type(model: nn.Module, mix: Mix | None) -> GGUFType:
    """The type general.file_type names: the mix's, else the most common type of the codes (F32 when none)."""
    if mix is not None:
        return mix.blocks
    types = [_layer_type(m) for m in model.modules() if isinstance(m, FairLinear)]
    return max(set(types), key=types.count) if types else GGUFType.F32


def _layer_type(layer: FairLinear) -> GGUFType | None:
    return layer_type(layer.w_bits, layer.grid)


def _float_type(gguf_name: str, tensor: torch.Tensor, mix: Mix | None) -> GGUFType:
    """A float tensor's type: the mix's for the embedding and the head and, in a float file, every matrix;
    F32 otherwise (norms, biases, and what calibration left in float stay exact)."""
    if mix is None or tensor.dim() < 2:
        return GGUFType.F32
    if gguf_name == "token_embd.weight":
        return mix.embedding_type(tensor.shape[-1])
    if gguf_name == "output.weight":
        return mix.head_type(tensor.shape[-1])
    return mix.blocks if mix.blocks in FLOATS else GGUFType.F32


def log_scale_rounding(model: nn.Module) -> None:
    """One warning for the whole export when GGUF's fp16 block scales round the model's scales."""
    rounded, worst, dtypes = 0, 0.0, set()
    layers = [m for m in model.modules() if isinstance(m, FairLinear)]
    for layer in layers:
        scale = layer.weight_scale
        if scale.dtype == torch.float16 or _layer_type(layer) not in BLOCK_BITS:
            continue  # K-quant scales are written as fp16 x integer levels, exactly
        s = scale.float()
        change = ((s.half().float() - s).abs() / s.abs().clamp(min=1e-30)).max().item()
        if change:
            rounded, worst = rounded + 1, max(worst, change)
            dtypes.add(str(scale.dtype).removeprefix("torch."))
    if rounded:
        logger.warning("GGUF: %d of %d layers have %s scales, rounded to GGUF's fp16 (largest relative change "
                       "%.2e); quantize the model loaded in fp16 (--dtype float16, or auto for the shipped "
                       "model) for an exact export", rounded, len(layers), "/".join(sorted(dtypes)), worst)


def _warn_if_rounded(name: str, scale: torch.Tensor) -> None:
    if scale.dtype == torch.float16:
        return
    s = scale.float()
    change = ((s.half().float() - s).abs() / s.abs().clamp(min=1e-30)).max().item()
    if change:
        logger.debug("%s: %s scales rounded to GGUF's fp16 (largest relative change %.2e); calibrate in "
                     "fp16 for an exact export", name, str(scale.dtype).removeprefix("torch."), change)


def _write_tensors(writer, model: nn.Module, names, gguf, mix: Mix | None = None) -> None:
    cfg = model.config
    heads = {"q_proj": cfg.n_heads, "k_proj": cfg.n_kv_heads or cfg.n_heads} if cfg.model_type == "llada" else {}
    fair = {name: m for name, m in model.named_modules() if isinstance(m, FairLinear)}
    stacks: dict[str, dict[int, np.ndarray | torch.Tensor]] = {}  # "<layer>.<w>" -> expert -> its data
    for name, tensor in model.state_dict().items():
        module_name, _, leaf = name.rpartition(".")
        if module_name in fair and leaf not in ("weight", "bias"):
            continue  # the scales travel inside the Q4_0 / Q8_0 blocks
        if match := EXPERT.match(name):  # stacked once every expert of the layer is seen
            _add_expert(writer, stacks, match, fair.get(module_name), tensor, cfg.num_experts, names, gguf, mix)
            continue
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"{name}: no GGUF name for this tensor in the {cfg.model_type} layout")
        n_head = heads.get(module_name.rpartition(".")[2])
        if module_name in fair and leaf == "weight":
            layer = fair[module_name]
            codes, scale, mins = layer.codes(), layer.weight_scale, layer.weight_min
            if n_head:
                codes, scale = rotary_permute(codes, n_head), rotary_permute(scale, n_head)
                mins = None if mins is None else rotary_permute(mins, n_head)
            qtype = _layer_type(layer)
            if qtype in BLOCK_BITS:
                _warn_if_rounded(name, scale)
            writer.add_tensor(gguf_name, layer_blocks(codes, scale, mins, layer.group_size, qtype),
                              raw_dtype=gguf.GGMLQuantizationType[qtype.value])
            continue
        # float tensors F32 unless the mix says otherwise (exact for any source dtype: with an F16 head
        # llama.cpp would also round its activations to fp16, which moved a greedy decode here)
        t = tensor.detach().float()
        if n_head:
            t = rotary_permute(t, n_head)
        data, raw = encode(t, _float_type(gguf_name, t, mix))
        writer.add_tensor(gguf_name, data, raw_dtype=None if raw is None else gguf.GGMLQuantizationType[raw])


def _add_expert(writer, stacks: dict, match: re.Match, layer: FairLinear | None, tensor: torch.Tensor,
                n_experts: int, names, gguf, mix: Mix | None) -> None:
    """Collect one expert's weight; with all `n_experts` of its layer, write them as one 3-D tensor."""
    key = f"{match['layer']}.{match['w']}"
    if layer is not None:
        own = _layer_type(layer)
        if own in BLOCK_BITS:
            _warn_if_rounded(match.string, layer.weight_scale)
        data = layer_blocks(layer.codes(), layer.weight_scale, layer.weight_min, layer.group_size, own)  # (N, bytes)
        qtype = gguf.GGMLQuantizationType[own.value]
    else:
        data, raw = encode(tensor.float(), _float_type("", tensor, mix))
        qtype = None if raw is None else gguf.GGMLQuantizationType[raw]
    stacks.setdefault(key, {})[int(match["e"])] = (data, qtype)
    if len(stacks[key]) < n_experts:
        return
    parts = stacks.pop(key)
    if len({q for _, q in parts.values()}) != 1:
        raise ValueError(f"{key}: GGUF stacks a layer's experts in one type; they are quantized differently")
    stacked = np.stack([parts[e][0] for e in range(n_experts)])  # (E, N, bytes) or (E, N, K)
    merged = names.get_name(f"{key}.weight", try_suffixes=(".weight",))
    writer.add_tensor(merged, stacked, raw_dtype=parts[0][1])
