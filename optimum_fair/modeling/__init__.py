"""Native transformers-5 implementations of the LLaDA, LLaDA-MoE, LLaDA2 and Dream diffusion LMs.

Importing this package registers nothing; call :func:`register_native_models`.
"""

from ..masks import block_diffusion_mask  # the models' block-causal mask, shared with scoring
from .auto import register_native_models
from .configuration_dream import DREAM_MASK_TOKEN_ID, DreamConfig
from .configuration_llada import LLADA_MASK_TOKEN_ID, LLaDAConfig
from .configuration_llada2 import LLADA2_MASK_TOKEN_ID, LLaDA2MoeConfig
from .configuration_lladamoe import LLADA_MOE_MASK_TOKEN_ID, LLaDAMoEConfig
from .modeling_dream import DreamBaseModel, DreamDecoderLayer, DreamModel, DreamPreTrainedModel
from .modeling_llada import LLaDABlock, LLaDAModel, LLaDAModelLM, LLaDAPreTrainedModel
from .modeling_llada2 import LLaDA2MoeDecoderLayer, LLaDA2MoeModelLM, LLaDA2MoePreTrainedModel
from .modeling_lladamoe import LLaDAMoEDecoderLayer, LLaDAMoEModelLM, LLaDAMoEPreTrainedModel
from .tokens import require_mask_token_id

__all__ = [
    "DREAM_MASK_TOKEN_ID",
    "LLADA2_MASK_TOKEN_ID",
    "LLADA_MASK_TOKEN_ID",
    "LLADA_MOE_MASK_TOKEN_ID",
    "DreamBaseModel",
    "DreamConfig",
    "DreamDecoderLayer",
    "DreamModel",
    "DreamPreTrainedModel",
    "LLaDA2MoeConfig",
    "LLaDA2MoeDecoderLayer",
    "LLaDA2MoeModelLM",
    "LLaDA2MoePreTrainedModel",
    "LLaDABlock",
    "LLaDAConfig",
    "LLaDAModel",
    "LLaDAModelLM",
    "LLaDAMoEConfig",
    "LLaDAMoEDecoderLayer",
    "LLaDAMoEModelLM",
    "LLaDAMoEPreTrainedModel",
    "LLaDAPreTrainedModel",
    "block_diffusion_mask",
    "register_native_models",
    "require_mask_token_id",
]
