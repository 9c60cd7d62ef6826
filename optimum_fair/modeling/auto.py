"""Registration of the native LLaDA, LLaDA-MoE, LLaDA2 and Dream classes with the transformers Auto API."""

from __future__ import annotations

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    PretrainedConfig,
    PreTrainedModel,
)

from .configuration_dream import DreamConfig
from .configuration_llada import LLaDAConfig
from .configuration_llada2 import LLaDA2MoeConfig
from .configuration_lladamoe import LLaDAMoEConfig
from .modeling_dream import DreamModel
from .modeling_llada import LLaDAModelLM
from .modeling_llada2 import LLaDA2MoeModelLM
from .modeling_lladamoe import LLaDAMoEModelLM

__all__ = ["register_native_models"]

_AUTO_MODEL_CLASSES = (AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM)


def _native_pairs() -> list[tuple[type[PretrainedConfig], type[PreTrainedModel]]]:
    return [(LLaDAConfig, LLaDAModelLM), (LLaDAMoEConfig, LLaDAMoEModelLM), (LLaDA2MoeConfig, LLaDA2MoeModelLM),
            (DreamConfig, DreamModel)]


def register_native_models() -> None:
    """Map ``model_type`` "llada", "lladamoe", "llada2_moe" and "Dream" to the native classes. Idempotent.

    After this, a released ``config.json`` whose ``auto_map`` points at remote code
    loads with ``AutoConfig`` / ``AutoModel`` / ``AutoModelForCausalLM`` /
    ``AutoModelForMaskedLM`` into the native classes when ``trust_remote_code`` is
    not set; the remote code is neither downloaded nor run.
    """
    for config_cls, model_cls in _native_pairs():
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)  # exist_ok: re-registering is a no-op
        for auto_cls in _AUTO_MODEL_CLASSES:
            auto_cls.register(config_cls, model_cls, exist_ok=True)
