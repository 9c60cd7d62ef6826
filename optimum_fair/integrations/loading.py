"""Load a checkpoint by path or Hub id into the class that keeps its LM head.

`AutoModel` maps a family to its headless base class for transformers' own families (``llama`` ->
`LlamaModel`, ``diffusion_gemma`` -> `DiffusionGemmaModel`): the LM head's weights are dropped, and a
quantized save of it has no ``lm_head.weight``. `model_class` takes the class the checkpoint names
(``config.architectures[0]``), else the first auto class with a head that knows the config.
"""

from __future__ import annotations

import logging
from typing import Any

import transformers
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoModelForMaskedLM,
    PreTrainedModel,
)

logger = logging.getLogger(__name__)

# auto classes whose models end in an LM head, in the order they are tried (the native dLLMs are
# registered with the first two, `modeling.auto`)
_HEADED = (AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForImageTextToText)


def model_class(config: Any, trust_remote_code: bool = False) -> Any:
    """The class (or auto class) whose `from_pretrained` loads a checkpoint of `config` with its LM head.

    config.architectures[0] when transformers has that class; remote code (``auto_map``, with
    trust_remote_code) through the auto class it names; else the first auto class with a head mapping
    the config (AutoModel only when none does).
    """
    names = getattr(config, "architectures", None) or []
    auto_map = getattr(config, "auto_map", None) or {}
    if trust_remote_code and auto_map:
        return next((a for a in _HEADED if a.__name__ in auto_map), AutoModel)
    cls = getattr(transformers, names[0], None) if names else None
    if isinstance(cls, type) and issubclass(cls, PreTrainedModel):
        return cls
    for auto in _HEADED:
        if type(config) in auto._model_mapping:
            return auto
    logger.warning("%s: no transformers class with an LM head for model_type %r; loading with AutoModel",
                   getattr(config, "_name_or_path", "?"), getattr(config, "model_type", None))
    return AutoModel


def load_pretrained(name: str, revision: str | None = None, trust_remote_code: bool = False, **kwargs: Any) -> Any:
    """`from_pretrained(name, **kwargs)` through `model_class` of the checkpoint's config."""
    config = AutoConfig.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    cls = model_class(config, trust_remote_code)
    return cls.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code, **kwargs)
