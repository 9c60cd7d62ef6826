"""input_mode="corrected", after the blocks: the float LM head refitted to the quantized body.

The head stays float in the model (a GGUF export rounds it to the mix's head type, as llama-quantize
does). Its weight becomes `gptq.drift_target(W, H, D)`: the weight whose logits on the quantized body's
final hidden states best match the FP head's logits on the FP model's (H and D from the head's inputs on
the two last-block streams, through the model's own tail: final norm and anything else before the head).
On the shipped model's Q4_0 mix this took the flip rate from 0.079 / 0.102 to 0.076 / 0.096 (seeds 0 / 1)
and the NLL down on both held-out texts (docs/export.md).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

import torch
from torch import nn

from ..calib.gptq import drift_sum, drift_target, hessian_sum
from ..distributed import DataShard

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

    d, B, n = head.in_features, shard.batch_size, 0
    H = torch.zeros(d, d, dtype=torch.float64, device=head.weight.device)  # Σ w x̃ x̃ᵀ
    D = torch.zeros_like(H)  # Σ w (x_fp - x̃) x̃ᵀ
    with _last_block_gives(last_block, given), contextlib.ExitStack() as stack:
        stack.callback(head.register_forward_pre_hook(take).remove)
        for r in range(shard.rounds):  # round r: batch r * N + rank on this rank, if any
            present = r * B < streams["q"].shape[0]
            parts = {"H": torch.zeros(d, d, device=H.device), "D": torch.zeros(d, d, device=H.device)}
            if present:
                x = {}
                for side in ("fp", "q"):
                    given["x"] = streams[side][r * B:(r + 1) * B]
                    with contextlib.suppress(_HeadReached):
                        forward(torch.zeros(given["x"].shape[:2], dtype=torch.long))
                    x[side] = found.pop("x").to(H.device)
                w = weights if weights is None or weights.dim() == 1 else weights[r * B:(r + 1) * B]
                parts = {"H": hessian_sum(x["q"], w, dtype=torch.float32)[0],
                         "D": drift_sum(x["fp"], x["q"], w, dtype=torch.float32)}
                n += x["q"].shape[:-1].numel()
            H = shard.world.fold(H, parts["H"], present, what="Hessian of the LM head")
            D = shard.world.fold(D, parts["D"], present, what="input drift of the LM head")
    count = int(shard.world.all_reduce_sum(torch.tensor([n], dtype=torch.int64), "calibration token counts")[0])
    head.weight.copy_(drift_target(head.weight.float(), H / count, D / count, damp))
    logger.info("input_mode='corrected': LM head refitted to the quantized body (%d tokens)", count)
    return True
