"""Special-token look-ups shared by samplers, scorers and calibration code."""

from __future__ import annotations

from typing import Any

__all__ = ["require_mask_token", "require_mask_token_id"]


def require_mask_token_id(config: Any) -> int:
    """Return ``config.mask_token_id`` as an int, or raise ``ValueError`` if it is unset.

    Released LLaDA configs carry 126336 and Dream configs 151666, and the native
    config classes default to those values; a config whose ``mask_token_id`` is
    ``None`` (set explicitly, or a foreign config without the field) cannot be
    used for masked diffusion.
    """
    mask_id = getattr(config, "mask_token_id", None)
    if mask_id is None:
        name = type(config).__name__
        raise ValueError(
            f"{name}.mask_token_id: expected the id of the mask token (126336 for LLaDA, "
            f"151666 for Dream), got None"
        )
    if isinstance(mask_id, bool) or not isinstance(mask_id, int) or mask_id < 0:
        raise ValueError(f"{type(config).__name__}.mask_token_id: expected a non-negative int, got {mask_id!r}")
    return mask_id


def require_mask_token(tokenizer: Any) -> int:
    """Return the tokenizer's mask token id; raise ValueError if it has none."""
    mask_id = getattr(tokenizer, "mask_token_id", None)
    if mask_id is None:
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} has no mask token (mask_token_id is None); a masked "
            "diffusion LM needs one: set tokenizer.mask_token or load the model's own tokenizer"
        )
    return int(mask_id)
