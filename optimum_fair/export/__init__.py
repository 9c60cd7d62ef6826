"""Publishing a quantized model: the folder (`folder`), its model card (`card`), the Hub push (`hub`)."""

from .card import build_card
from .folder import save_quantized
from .hub import HubPushError, push_model, push_quantized, require_token

__all__ = ["HubPushError", "build_card", "push_model", "push_quantized", "require_token", "save_quantized"]
