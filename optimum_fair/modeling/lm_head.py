"""The LM wrapper the native families share: token ids -> embeddings -> the backbone -> the head -> logits.

A family's LM class lists `DiffusionLMMixin` first among its bases (before its `PreTrainedModel`), holds its
backbone at ``self.model`` and names where the token embedding lives (``input_embeddings_path``). The
backbone is called as ``model(inputs_embeds, attention_mask, position_ids, output_hidden_states)``, plus
``(cache, cache_position)`` when the family runs Fast-dLLM's approximate KV cache
(``_supports_approximate_cache``, see `kv_cache`), and returns (final state, hidden states or None);
``head`` turns the final state into logits (default: ``self.lm_head``).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutput

from .kv_cache import lm_output, resolve_cache, supports_approximate_cache
from .layers import resolve_position_ids

__all__ = ["DiffusionLMMixin"]


class DiffusionLMMixin:
    """Input / output embeddings and the forward of a native diffusion LM (backbone ``model``, head ``lm_head``).

    ``forward(input_ids | inputs_embeds, attention_mask=None, position_ids=None)`` returns ``CausalLMOutput``
    (``CausalLMOutputWithPast`` when a cache was used) with ``logits`` (batch, seq, vocab), or the tuple
    (logits[, hidden_states]) with ``return_dict=False``. ``hidden_states`` (``output_hidden_states``, default
    the config's): what the backbone records. No loss.
    """

    input_embeddings_path = "model.embed_tokens"  # the token embedding's module path, from the LM

    def get_input_embeddings(self) -> nn.Module:
        return self.get_submodule(self.input_embeddings_path)

    def set_input_embeddings(self, value: nn.Module) -> None:
        parent, _, name = self.input_embeddings_path.rpartition(".")
        setattr(self.get_submodule(parent), name, value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def head(self, final: torch.Tensor) -> torch.Tensor:
        """The backbone's final state (batch, seq, hidden) -> logits (batch, seq, vocab)."""
        return self.lm_head(final)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        use_cache: bool | None = None,
        past_key_values=None,
        cache_position: torch.LongTensor | None = None, cache=None,
    ) -> CausalLMOutput | tuple:
        """See the class docstring. ``position_ids``: (batch, seq) or (seq,); default 0..seq-1 (with a
        cache: ``cache_position``). ``use_cache`` / ``past_key_values`` (``cache``) / ``cache_position``: the
        approximate KV cache (`kv_cache`), for the families that have one."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("input_ids / inputs_embeds: expected exactly one of them")
        cached = supports_approximate_cache(self)
        if not cached and (use_cache or past_key_values is not None or cache is not None or cache_position is not None):
            raise ValueError(f"use_cache: expected False or None ({type(self).__name__} has no KV cache; "
                             "past_key_values, cache and cache_position must be None too)")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)  # (batch, seq, hidden)
        batch, seq, _ = inputs_embeds.shape
        if cached:
            cache, position_ids = resolve_cache(past_key_values, use_cache, cache_position, position_ids, seq,
                                                inputs_embeds.device, cache)
        position_ids = resolve_position_ids(position_ids, batch, seq, inputs_embeds.device)
        want_states = bool(self.config.output_hidden_states if output_hidden_states is None else output_hidden_states)
        extra = (cache, cache_position) if cached else ()
        final, states = self.model(inputs_embeds, attention_mask, position_ids, want_states, *extra)
        return lm_output(self.head(final), states, cache, return_dict)
