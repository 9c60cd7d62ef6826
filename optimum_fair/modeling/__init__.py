"""Native transformers-5 implementations of the LLaDA, LLaDA-MoE and Dream diffusion LMs.

Importing this package registers nothing; call :func:`register_native_models`.
"""

from .auto import register_native_models
from .configuration_dream import DREAM_MASK_TOKEN_ID, DreamConfig
from .configuration_llada import LLADA_MASK_TOKEN_ID, LLaDAConfig
from .configuration_lladamoe import LLADA_MOE_MASK_TOKEN_ID, LLaDAMoEConfig
from .modeling_dream import DreamBaseModel, DreamDecoderLayer, DreamModel, DreamPreTrainedModel
from .modeling_llada import LLaDABlock, LLaDAModel, LLaDAModelLM, LLaDAPreTrainedModel
from .modeling_lladamoe import LLaDAMoEDecoderLayer, LLaDAMoEModelLM, LLaDAMoEPreTrainedModel
from .tokens import require_mask_token_id

__all__ = [
    "DREAM_MASK_TOKEN_ID",
    "LLADA_MASK_TOKEN_ID",
    "LLADA_MOE_MASK_TOKEN_ID",
    "DreamBaseModel",
    "DreamConfig",
    "DreamDecoderLayer",
    "DreamModel",
    "DreamPreTrainedModel",
    "LLaDABlock",
    "LLaDAConfig",
    "LLaDAModel",
    "LLaDAModelLM",
    "LLaDAMoEConfig",
    "LLaDAMoEDecoderLayer",
    "LLaDAMoEModelLM",
    "LLaDAMoEPreTrainedModel",
    "LLaDAPreTrainedModel",
    "register_native_models",
    "require_mask_token_id",
]
