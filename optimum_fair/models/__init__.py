"""Architecture adapters."""

from .adapters import ADAPTERS, DREAM, LLADA, LLAMA_LIKE, ModelAdapter, get_adapter

__all__ = ["ADAPTERS", "DREAM", "LLADA", "LLAMA_LIKE", "ModelAdapter", "get_adapter"]
