"""Publishing a quantized model: the folder (`folder`), its model card (`card`), the Hub push (`hub`),
and formats other engines load (`engines`: GGUF, compressed-tensors)."""

from .card import build_card
from .engines import FORMATS, export
from .folder import save_quantized
from .hub import HubPushError, push_model, push_quantized, require_token

__all__ = ["FORMATS", "HubPushError", "build_card", "export", "push_model", "push_quantized", "require_token",
           "save_quantized"]
