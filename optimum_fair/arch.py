"""Architecture facts as data: where the blocks are, which linears share an input, mask id, logit shift.

`get_adapter(model)` picks the record by `config.model_type`; an unknown type raises, listing the known
ones. Architecture names live here and nowhere else in the package: the block paths, the linear groups,
the mask id and the logit shift are read from these records only.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .enums import Algorithm, LikelihoodEstimator


@dataclass(frozen=True)
class ExpertLayout:
    """Where a block's routed experts live (mixture-of-experts families).

    path: the `modeling.experts.RoutedExperts` module, relative to the block; its children 0 .. E-1 are the experts.
    groups: the linears of one expert (names relative to it) in forward order, grouped as `groups`.
    router: the router linear, relative to the block; it stays in floating point unless the user's own
        modules_to_not_convert leaves it out.
    after: groups that run after the experts (a shared expert), relative to the block.
    fused: the model stores its experts as transformers 5's fused 3-D `gate_up_proj` (E, 2 inter, d) and
        `down_proj` (E, d, inter) at `path`; they become a `RoutedExperts` of `GatedExpert` linears
        (`gate_up_proj`, `down_proj`) before calibration or loading.
    """

    path: str
    groups: tuple[tuple[str, ...], ...]
    router: str
    after: tuple[tuple[str, ...], ...] = ()
    fused: bool = False


@dataclass(frozen=True)
class ModelAdapter:
    """How FAIR-Calib walks one model family.

    blocks: dotted path of the `nn.ModuleList` of decoder blocks.
    groups: linears of a block (names relative to the block) in forward order; the linears of one
        group read the same input, so they share one input transform and one Hessian.
    mask_token_id: the release's mask id, used when the config carries none (None = must be given).
    logit_shift: 0 when position i's logits predict token i; 1 when they predict token i + 1 (Dream,
        autoregressive-initialised), so the prediction for position i is logits[:, i - 1].
    max_length_attrs: config attributes that may hold the maximum sequence length, in order.
    likelihood: the release's Monte-Carlo likelihood estimator (`eval.likelihood`, the lm-eval backend).
    sampler: the release's diffusion sampler (the lm-eval backend's default for generation).
    experts: the routed experts of a mixture-of-experts family (None: dense). A block then holds the
        `groups` it has (a dense layer its MLP, an MoE layer none of it), every expert's groups and `after`.
    block_diffusion: the family decodes with block-causal attention (LLaDA2): every teacher forward of
        Stage I and II passes `masks.block_diffusion_mask` over blocks of the run's block_length.
    tied_blocks: dotted path of blocks that share every weight with `blocks` (DiffusionGemma's encoder
        text layers): they end up holding the very same packed modules as the calibrated blocks.
    canvas: the family denoises a canvas of uniformly random tokens after an encoded prompt
        (DiffusionGemma): calibration text is fed as noisy canvases after a one-token prompt, and there
        is no masked commit order for Stage I (the run uses uniform weighting, saying why).
    float_modules: the default modules_to_not_convert (routers are added); None = transformers' own list
        (the LM head and tied embeddings), which for a family with tied blocks names every block.
    roles: the linears llama.cpp's GGUF mixes treat apart ("attn_v", "ffn_down"), by name in a block.
    """

    name: str
    model_types: tuple[str, ...]
    blocks: str
    groups: tuple[tuple[str, ...], ...]
    mask_token_id: int | None = None
    logit_shift: int = 0
    max_length_attrs: tuple[str, ...] = ("max_position_embeddings",)
    likelihood: LikelihoodEstimator = LikelihoodEstimator.LLADA
    sampler: Algorithm = Algorithm.LLADA
    experts: ExpertLayout | None = None
    block_diffusion: bool = False
    tied_blocks: str | None = None
    canvas: bool = False
    float_modules: tuple[str, ...] | None = None
    roles: tuple[tuple[str, str], ...] = ()  # (linear name in a block, llama.cpp's role): what GGUF mixes key on

    def block_list(self, model: nn.Module) -> nn.ModuleList:
        """The decoder blocks of `model` (raises if the path does not exist)."""
        try:
            blocks = model.get_submodule(self.blocks)
        except AttributeError:
            raise ValueError(f"{type(model).__name__} has no module {self.blocks!r} ({self.name} adapter)") from None
        if not isinstance(blocks, nn.ModuleList):
            raise ValueError(f"{self.blocks} of {type(model).__name__} is {type(blocks).__name__}, not a ModuleList")
        return blocks

    def linear_names(self) -> list[str]:
        return [name for group in self.groups for name in group]

    def block_groups(self, block: nn.Module) -> tuple[tuple[str, ...], ...]:
        """The linear groups of one block in forward order (dense families: `groups` as they are)."""
        if self.experts is None:
            return self.groups
        lay = self.experts
        found = [tuple(n for n in g if _has(block, n)) for g in self.groups]  # layers differ (v_proj, mlp)
        found = [g for g in found if g]
        if _has(block, lay.path):
            for e in range(len(block.get_submodule(lay.path))):
                found += [tuple(f"{lay.path}.{e}.{n}" for n in g) for g in lay.groups]
            found += [g for g in lay.after if _has(block, g[0])]
        return tuple(found)

    def resolve_mask_token_id(self, config) -> int:
        """config.mask_token_id, else the release's id."""
        mask_id = getattr(config, "mask_token_id", None)
        if mask_id is None:
            mask_id = self.mask_token_id
        if mask_id is None:
            raise ValueError(
                f"config.mask_token_id is not set and the {self.name} adapter has no default; set it on the config"
            )
        return int(mask_id)

    def mask_id(self, config) -> int:
        """The mask id to decode with: `resolve_mask_token_id`, checked against the vocabulary when known."""
        mask_id = self.resolve_mask_token_id(config)
        vocab = getattr(config, "vocab_size", None)
        if isinstance(vocab, int) and not 0 <= mask_id < vocab:
            given = getattr(config, "mask_token_id", None) is not None
            source = "config.mask_token_id" if given else f"the {self.name} release's mask_token_id (config has none)"
            raise ValueError(f"{source} = {mask_id} is outside the vocabulary (vocab_size {vocab}): set "
                             "config.mask_token_id to the id of the mask token")
        return mask_id

    def max_length(self, config) -> int | None:
        for attr in self.max_length_attrs:
            value = getattr(config, attr, None)
            if value:
                return int(value)
        return None


def _has(module: nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
    except AttributeError:
        return False
    return True


LLADA = ModelAdapter(
    name="llada",
    model_types=("llada",),
    blocks="model.transformer.blocks",
    groups=(("q_proj", "k_proj", "v_proj"), ("attn_out",), ("ff_proj", "up_proj"), ("ff_out",)),
    roles=(("v_proj", "attn_v"), ("ff_out", "ffn_down")),
    mask_token_id=126336,
    logit_shift=0,
    max_length_attrs=("max_sequence_length", "max_position_embeddings"),
)

_QWEN2_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
_QWEN2_ROLES = (("self_attn.v_proj", "attn_v"), ("mlp.down_proj", "ffn_down"))

DREAM = ModelAdapter(
    name="dream",
    model_types=("Dream", "dream"),
    blocks="model.layers",
    groups=_QWEN2_GROUPS,
    roles=_QWEN2_ROLES,
    mask_token_id=151666,
    logit_shift=1,
    likelihood=LikelihoodEstimator.DREAM,
    sampler=Algorithm.DREAM,
)

_GATED_MLP = (("gate_proj", "up_proj"), ("down_proj",))

LLADA_MOE = ModelAdapter(
    name="llada-moe",
    model_types=("lladamoe",),
    blocks="model.layers",
    groups=_QWEN2_GROUPS,  # attention always; mlp.* only in dense layers (moe_layer_freq 0)
    roles=_QWEN2_ROLES,
    mask_token_id=156895,
    logit_shift=0,
    experts=ExpertLayout(path="mlp.experts", groups=_GATED_MLP, router="mlp.gate",
                         after=tuple(tuple(f"shared_expert.{n}" for n in g) for g in _GATED_MLP)),
)

LLADA2 = ModelAdapter(
    name="llada2",
    model_types=("llada2_moe",),
    blocks="model.layers",
    groups=(("attention.query_key_value",), ("attention.dense",), ("mlp.gate_proj", "mlp.up_proj"),
            ("mlp.down_proj",)),  # mlp.* only in the first_k_dense_replace dense layers
    mask_token_id=156895,
    logit_shift=0,
    experts=ExpertLayout(path="mlp.experts", groups=_GATED_MLP, router="mlp.gate",
                         after=tuple(tuple(f"mlp.shared_experts.{n}" for n in g) for g in _GATED_MLP)),
    block_diffusion=True,
    sampler=Algorithm.LLADA2,
)

DIFFUSION_GEMMA = ModelAdapter(
    name="diffusion-gemma",
    model_types=("diffusion_gemma",),
    blocks="model.decoder.layers",
    groups=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
            ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)),  # full-attention layers have no v_proj
    experts=ExpertLayout(path="experts", groups=(("gate_up_proj",), ("down_proj",)), router="router.proj",
                         fused=True),
    tied_blocks="model.encoder.language_model.layers",
    canvas=True,
    float_modules=("lm_head", "model.encoder.vision_tower", "model.encoder.embed_vision",
                   "model.decoder.self_conditioning"),
    max_length_attrs=(),
)

# Autoregressive families with the same layout: quantizable (round-to-nearest, GPTQ, transforms) with
# the masked-diffusion parts (Stage I, metrics) needing a mask_token_id on the config.
LLAMA_LIKE = ModelAdapter(
    name="llama-like",
    model_types=("llama", "qwen2", "mistral", "qwen3"),
    blocks="model.layers",
    groups=_QWEN2_GROUPS,
    roles=_QWEN2_ROLES,
    logit_shift=1,
    likelihood=LikelihoodEstimator.DREAM,  # autoregressive-initialised, as Dream
    sampler=Algorithm.DREAM,
)

ADAPTERS: tuple[ModelAdapter, ...] = (LLADA, LLADA_MOE, LLADA2, DIFFUSION_GEMMA, DREAM, LLAMA_LIKE)


def find_adapter(model_or_config) -> ModelAdapter | None:
    """The adapter for a model (or its config) by `model_type`, or None."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    return next((a for a in ADAPTERS if model_type in a.model_types), None)


def get_adapter(model_or_config) -> ModelAdapter:
    """The adapter for a model (or its config), by `model_type`; an unknown type raises."""
    adapter = find_adapter(model_or_config)
    if adapter is not None:
        return adapter
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    known = sorted(t for a in ADAPTERS for t in a.model_types)
    raise ValueError(f"No optimum-fair adapter for model_type {model_type!r}; known model types: {known}")
