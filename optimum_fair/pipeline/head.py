"""input_mode="corrected", after the blocks: the float LM head refitted to the quantized body.

The head stays float in the model (a GGUF export rounds it to the mix's head type, as llama-quantize
does). Its weight becomes `gptq.drift_target(W, H, D)`: the weight whose logits on the quantized body's
final hidden states best match the FP head's logits on the FP model's (H and D from the head's inputs on
the two last-block streams, through the model's own tail: final norm and anything else before the head).
A prototype of this step on the shipped model's Q4_0 mix took the flip rate from 0.079 / 0.102 to
0.076 / 0.096 (seeds 0 / 1) and the NLL down on both held-out texts; docs/export.md has the full recipe's.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

import torch
from torch import nn

from ..calib.gptq import drift_target
from ..distributed import DataShard
from .stats import drift_moments

logger = logging.getLogger(__name__)


class _HeadReached(Exception):
    """Raised by the head's pre-hook once its input is stored: the logits are not needed."""


@contextlib.contextmanager
def _last_block_gives(block: nn.Module, value: dict) -> Iterator[None]:
    """block's output hidden states replaced by value["x"] (b, seq, d) in every call."""

    def hook(module, args, out):
        x = value["x"]
        if isinstance(out, tuple):
            return (x.to(out[0].device, out[0].dtype), *out[1:])
        return x.to(out.device, out.dtype)

    handle = block.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def refit_head(model: nn.Module, last_block: nn.Module, forward: Callable[[torch.Tensor], None],
               streams: dict[str, torch.Tensor], weights: torch.Tensor | None, shard: DataShard,
               damp: float) -> bool:
    """Refit the float LM head of `model` in place to the quantized body; False (nothing changed) where the
    head is not a float nn.Linear of its own (tied to the embedding, or converted).

    streams: {"fp": the FP model's, "q": the quantized model's last-block outputs} (n_local, seq, d) float32,
    this process's samples; forward(ids) runs `model` on a batch of ids (`stage2.model_forward`): its blocks'
    output is replaced by the stream's, so only the tail matters. weights: the Stage II token weights. Sums
    are added in global batch order over the processes (`World.fold`), like the blocks' Hessians.
    """
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if type(head) is not nn.Linear or embedding is None or head.weight is embedding.weight:
        logger.info("input_mode='corrected': the LM head is not a float linear of its own; left as it is")
        return False
    found, given = {}, {}

    def take(module, args):
        found["x"] = args[0].detach().float()  # (b, seq, d)
        raise _HeadReached

    def inputs(lo: int, hi: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        x = {}
        for side in ("fp", "q"):
            given["x"] = streams[side][lo:hi]
            with contextlib.suppress(_HeadReached):
                forward(torch.zeros(given["x"].shape[:2], dtype=torch.long))
            x[side] = found.pop("x").to(head.weight.device)
        return [(x["fp"], x["q"])]

    with _last_block_gives(last_block, given), contextlib.ExitStack() as stack:
        stack.callback(head.register_forward_pre_hook(take).remove)
        ((H, D),) = drift_moments(inputs, streams["q"].shape[0], weights, [head.in_features], ["the LM head"],
                                  head.weight.device, shard)
    head.weight.copy_(drift_target(head.weight.float(), H, D, damp))
    logger.info("input_mode='corrected': LM head refitted to the quantized body")
    return True
