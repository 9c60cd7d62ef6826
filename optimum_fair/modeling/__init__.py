"""Native transformers-5 implementations of the LLaDA and Dream diffusion LMs."""

from .configuration_llada import LLADA_MASK_TOKEN_ID, LLaDAConfig
from .modeling_llada import LLaDABlock, LLaDAModel, LLaDAModelLM, LLaDAPreTrainedModel
from .tokens import require_mask_token_id

__all__ = [
    "LLADA_MASK_TOKEN_ID",
    "LLaDABlock",
    "LLaDAConfig",
    "LLaDAModel",
    "LLaDAModelLM",
    "LLaDAPreTrainedModel",
    "require_mask_token_id",
]
