"""FlatQuant-style learned transforms (Sun et al., 2024) for linears that share one input, and their fit.

For an input x (..., d) read by one or more linears (q/k/v, gate/up, or a single one), a shared
`TransformParams` holds a Kronecker-factored invertible P = A kron B, A (n1, n1), B (n2, n2), a per-channel
smoothing scale s (d,) and an activation clipping ratio. Each linear W (out, d) becomes
    x̃ = (x / s) (A kron B)                       fake-quantized per token at a_bits, clip ratio α_a
    W̃ = W diag(s) (A kron B)^-T                  fake-quantized per output row at w_bits, clip ratio α_w
    y  = x̃ W̃ᵀ + b                                 (= x Wᵀ + b before rounding)
`CalibLinear` computes this differentiably (straight-through rounding), `fit_transforms` learns A, B, s and
the clips on the token-weighted block-output MSE, and `CalibLinear.export` returns the arguments of
`FairLinear.from_codes`. With kron="hadamard", trainable=False and no smoothing or clipping it is the
fixed QuaRot-style rotation (`hadamard_transform`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..enums import KronInit, Rounding, WeightGrid
from ..grids import BlockGrid
from ..ops import fake_quant_act, fake_quant_weight, kron_apply
from .gptq import GPTQFactor
from .methods import TransformMethod, rounding_method
from .objective import weighted_sq_error
from .rotation import kron_factors, random_hadamard_factors

__all__ = [
    "CalibLinear",
    "TransformParams",
    "channel_absmax",
    "fit_transforms",
    "hadamard_transform",
    "smooth_scale",
    "transform_params",
]

logger = logging.getLogger(__name__)



def identity_factors(d: int, generator: torch.Generator | None = None,
                     device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A = I (n1, n1), B = I (n2, n2) with n1 * n2 = d (`kron_factors`)."""
    n1, n2 = kron_factors(d)
    return torch.eye(n1, device=device), torch.eye(n2, device=device)


#: How each `KronInit` makes the factors (A, B) of a d-dim input: (d, generator, device) -> (A, B), or None.
KRON_INITS: dict[KronInit, Callable | None] = {
    KronInit.HADAMARD: random_hadamard_factors,
    KronInit.IDENTITY: identity_factors,
    KronInit.NONE: None,
}


def channel_absmax(x: torch.Tensor, running: torch.Tensor | None = None) -> torch.Tensor:
    """Per-channel max |x_j| over all tokens of x (..., d), folded into `running` (d,) if given."""
    amax = x.detach().abs().reshape(-1, x.shape[-1]).amax(dim=0).float()  # (d,)
    return amax if running is None else torch.maximum(running, amax)


def smooth_scale(
    act_absmax: torch.Tensor, weights: Iterable[torch.Tensor], alpha: float = 0.3
) -> torch.Tensor:
    """SmoothQuant-style scale s_j = max|x_j|^α / max|W_{:,j}|^(1−α), the max over all `weights` (out_k, d).

    Dividing x by s and multiplying W's columns by s moves outlier magnitude from activations to weights.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    w_list = list(weights)
    if not w_list:
        raise ValueError("weights must hold at least one weight matrix")
    w_absmax = torch.stack([w.detach().abs().float().amax(dim=0) for w in w_list]).amax(dim=0)  # (d,)
    if w_absmax.shape != act_absmax.shape:
        raise ValueError(f"act_absmax shape {tuple(act_absmax.shape)} does not match weights' in_features")
    s = act_absmax.float().clamp(min=1e-5).pow(alpha) / w_absmax.clamp(min=1e-5).pow(1 - alpha)
    return s.clamp(min=1e-5)


class TransformParams(nn.Module):
    """The transform shared by the linears reading one d-dim input: A, B, s and the activation clip."""

    def __init__(
        self,
        d: int,
        kron: KronInit = KronInit.HADAMARD,
        smooth: torch.Tensor | None = None,
        act_clip: bool = True,
        trainable: bool = True,
        generator: torch.Generator | None = None,
        clip_init_logit: float = 4.0,
        device: torch.device | str | None = None,
    ) -> None:
        """
        Args:
            d: input dimension.
            kron: a `KronInit` (a key of `KRON_INITS`): HADAMARD (random Hadamard factors, see
                `rotation.random_hadamard_factors`), IDENTITY (A = I, B = I, still learnable) or NONE.
            smooth: initial smoothing scale s (d,) (see `smooth_scale`), or None for no smoothing.
            act_clip: learn an activation clipping ratio sigmoid(logit), initialised at clip_init_logit
                (4.0 gives 0.982, as FlatQuant); False means no clipping (ratio 1).
            trainable: whether A, B and s get gradients (False: a fixed rotation, e.g. with learned clips).
        """
        super().__init__()
        if kron not in KRON_INITS:
            raise ValueError(f"kron must be one of {[k.value for k in KRON_INITS]}, got {kron!r}")
        if smooth is not None and tuple(smooth.shape) != (d,):
            raise ValueError(f"smooth must have shape ({d},), got {tuple(smooth.shape)}")
        self.d = d
        make = KRON_INITS[kron]
        A, B = (None, None) if make is None else make(d, generator, device)
        self.A = None if A is None else nn.Parameter(A, requires_grad=trainable)  # (n1, n1)
        self.B = None if B is None else nn.Parameter(B, requires_grad=trainable)  # (n2, n2)
        s = None if smooth is None else smooth.detach().float().clone().to(device)
        self.s = None if s is None else nn.Parameter(s, requires_grad=trainable)  # (d,)
        logit = torch.tensor(float(clip_init_logit), device=device)
        self.act_clip_logit = nn.Parameter(logit) if act_clip else None

    def act_clip(self) -> torch.Tensor | float:
        """The activation clipping ratio in (0, 1), or 1.0 without clipping."""
        return 1.0 if self.act_clip_logit is None else torch.sigmoid(self.act_clip_logit)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x̃ = (x / s) (A kron B), before activation quantization; x: (..., d)."""
        if self.s is not None:
            x = x / self.s.to(x.dtype)
        if self.A is not None:
            x = kron_apply(x, self.A, self.B)  # (..., d)
        return x

    def transform_weight(self, W: torch.Tensor) -> torch.Tensor:
        """W̃ = W diag(s) (A kron B)^-T = (W diag(s)) (A^-T kron B^-T), float32; W: (out, d)."""
        Wt = W.float()
        if self.s is not None:
            Wt = Wt * self.s.float().unsqueeze(0)  # (out, d): column j times s_j
        if self.A is not None:
            A_inv_t = torch.linalg.inv(self.A.float()).t()  # (n1, n1)
            B_inv_t = torch.linalg.inv(self.B.float()).t()  # (n2, n2)
            Wt = kron_apply(Wt, A_inv_t, B_inv_t)  # (out, d)
        return Wt


def hadamard_transform(
    d: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
) -> TransformParams:
    """The fixed QuaRot-style path: random Hadamard factors, no smoothing, no clipping, nothing learned."""
    return TransformParams(d, kron=KronInit.HADAMARD, smooth=None, act_clip=False, trainable=False,
                           generator=generator, device=device)


def transform_params(method: TransformMethod, d: int, generator: torch.Generator | None = None,
                     device: torch.device | str | None = None, smooth: torch.Tensor | None = None) -> TransformParams:
    """The `TransformParams` of `method` for a d-dim input; `smooth` (d,): its initial s when it has one."""
    return TransformParams(d, kron=method.kron, smooth=smooth if method.smooth_alpha is not None else None,
                           act_clip=method.clips, trainable=method.learned, generator=generator, device=device)


class CalibLinear(nn.Module):
    """An FP `nn.Linear` seen through a shared `TransformParams`, with fake W/A quantization and clips."""

    def __init__(
        self,
        linear: nn.Linear,
        params: TransformParams,
        w_bits: int,
        a_bits: int,
        group_size: int = -1,
        weight_clip: bool = True,
        clip_init_logit: float = 4.0,
        grid: WeightGrid = WeightGrid.FULL,
    ) -> None:
        """`weight_clip` learns a per-output-row ratio sigmoid(logit) (init clip_init_logit); the FP weight
        is frozen (a buffer sharing the linear's storage). `grid`: the weight grid (`ops.grid_top`)."""
        super().__init__()
        if linear.in_features != params.d:
            raise ValueError(f"params is for d={params.d}, linear has in_features={linear.in_features}")
        if group_size != -1 and (group_size <= 0 or linear.in_features % group_size):
            raise ValueError(f"group_size {group_size} must be -1 or divide in_features {linear.in_features}")
        self.w_bits, self.a_bits, self.group_size = w_bits, a_bits, group_size
        self.grid = grid
        self.register_buffer("weight", linear.weight.detach())  # (out, d)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())  # (out,)
        self.params = params
        logit = torch.full((linear.out_features, 1), float(clip_init_logit), device=linear.weight.device)
        self.weight_clip_logit = nn.Parameter(logit) if weight_clip else None
        self.quantize = True

    def weight_clip(self) -> torch.Tensor | float:
        """Per-row weight clipping ratio (out, 1) in (0, 1), or 1.0 without clipping."""
        return 1.0 if self.weight_clip_logit is None else torch.sigmoid(self.weight_clip_logit)

    def transformed_weight(self) -> torch.Tensor:
        """W̃ = W diag(s) (A kron B)^-T before rounding, float32 (out, d)."""
        return self.params.transform_weight(self.weight)

    def transformed_input(self, x: torch.Tensor, quantize_act: bool = False) -> torch.Tensor:
        """x̃ = (x / s)(A kron B), optionally fake-quantized: GPTQ's Hessian input; x: (..., d)."""
        xt = self.params(x)
        return fake_quant_act(xt, self.a_bits, self.params.act_clip()) if quantize_act else xt

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., d) -> (..., out)
        xt = self.transformed_input(x, quantize_act=self.quantize)
        Wt = self.transformed_weight()  # (out, d)
        if self.quantize:
            Wt = fake_quant_weight(Wt, self.w_bits, self.group_size, self.weight_clip(), self.grid)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(xt, Wt.to(x.dtype), bias)

    @torch.no_grad()
    def export(
        self,
        rounding: Rounding = Rounding.RTN,
        H: torch.Tensor | None = None,
        damp: float = 0.01,
        act_order: bool = False,
        block_size: int = 128,
        scale_dtype: torch.dtype = torch.float32,
        factor: GPTQFactor | None = None,
        target: torch.Tensor | None = None,
    ) -> dict:
        """Keyword arguments of `FairLinear.from_codes` (add `dtype`): the rounded transformed weight (or
        `target` (out, d), a transformed weight to round in its place: `gptq.drift_target`).

        rounding: RTN, or GPTQ with H (d, d) the Hessian of the *transformed* inputs (accumulate it
        from `transformed_input(x)` with `gptq.accumulate_hessian`), or `factor = gptq.gptq_factor(H)` shared
        by the linears of one group (`methods.ROUNDINGS` holds how each rounds). The weight clip is baked into the
        scale, so FairLinear's dequantized weight equals the fake-quantized one of `forward`.
        """
        method = rounding_method(rounding)
        Wt = self.transformed_weight() if target is None else target  # (out, d) float32
        clip = self.weight_clip()
        clip = clip.detach().float() if torch.is_tensor(clip) else clip
        codes, scale, mins = method.quantize(Wt, self.w_bits, self.group_size, clip, self.grid, scale_dtype, H=H,
                                             factor=factor, damp=damp, act_order=act_order, block_size=block_size)
        p = self.params
        block_grid = isinstance(self.grid, BlockGrid)  # K-quant scales are fp16 x integer products: kept in float32
        return {
            "codes": codes,
            "scale": scale,
            "mins": mins,
            "scale_dtype": torch.float32 if block_grid else None,
            "grid": self.grid if block_grid else None,
            "bias": None if self.bias is None else self.bias.clone(),
            "w_bits": self.w_bits,
            "a_bits": self.a_bits,
            "group_size": self.group_size,
            "transform_a": None if p.A is None else p.A.detach().clone(),
            "transform_b": None if p.B is None else p.B.detach().clone(),
            "input_scale": None if p.s is None else p.s.detach().clone(),
            "act_clip": None if p.act_clip_logit is None else float(p.act_clip()),
        }


def _param_groups(modules: Iterable[nn.Module], lr: float, clip_lr: float) -> list[dict]:
    """Trainable parameters, each once: '*clip_logit' ones at clip_lr, the others at lr."""
    seen: set[int] = set()
    main, clips = [], []
    for m in modules:
        for name, p in m.named_parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (clips if name.endswith("clip_logit") else main).append(p)
    if not main and not clips:
        raise ValueError("params has no trainable parameters")
    groups = [{"params": main, "lr": lr}] if main else []
    return groups + ([{"params": clips, "lr": clip_lr}] if clips else [])


def _batch_weights(weights: torch.Tensor | None, idx: torch.Tensor, device) -> torch.Tensor | None:
    if weights is None:
        return None
    w = weights if weights.dim() == 1 else weights[idx]  # (seq,) or (batch, seq)
    return w.to(device)


def fit_transforms(
    block_fn: Callable[[torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor | None,
    params: Iterable[nn.Module],
    epochs: int = 15,
    lr: float = 5e-3,
    clip_lr: float = 5e-2,
    batch_size: int = 4,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    sample_ids: torch.Tensor | None = None,
    num_samples: int | None = None,
) -> list[float]:
    """Learn transforms and clips so that block_fn(inputs) matches targets in token-weighted MSE.

    Args:
        block_fn: the quantized block (CalibLinears inside), batch (b, seq, d_in) -> (b, seq, d_out).
        inputs, targets: (n, seq, d_in) and (n, seq, d_out), e.g. on CPU; batches move to `device`.
        weights: token weights (seq,) or (n, seq), None for uniform (see `weighted_mse`).
        params: modules whose trainable parameters are fitted (CalibLinears and/or TransformParams);
            parameters named '*clip_logit' use clip_lr, the others lr.
        epochs, batch_size: passes over the n samples (reshuffled each epoch with `generator`).
        all_reduce, sample_ids, num_samples: data parallelism (all three or none). Each process passes
            its own rows of inputs/targets (and of 2-d weights), `sample_ids` (n_local,) their indices
            among the `num_samples` samples of all processes, and `all_reduce` a sum over processes.
            Every process draws the same permutation of all samples, so a step's batch is the one a
            single process would use; each runs the rows of it that it holds, and the loss terms and
            the gradients are summed over processes before the step, so the parameters stay identical.
    AdamW (no weight decay); each group's learning rate decays by cosine to 1e-3 of its start; each step
    minimises loss / loss.detach() (FlatQuant's normalisation). Returns the mean loss of each epoch.
    """
    n = _check_fit_args(inputs, targets, weights, epochs, batch_size, sample_ids, num_samples)
    groups = _param_groups(params, lr, clip_lr)
    trainable = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    total = max(epochs * math.ceil(n / batch_size), 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: 1e-3 + (1 - 1e-3) * 0.5 * (1 + math.cos(math.pi * min(t, total) / total))
    )
    device = inputs.device if device is None else device
    local_pos = torch.full((n,), -1, dtype=torch.long)  # global sample -> local row, -1 elsewhere
    n_local = inputs.shape[0]
    local_pos[torch.arange(n_local) if sample_ids is None else sample_ids] = torch.arange(n_local)
    history: list[float] = []
    for epoch in range(epochs):
        order = torch.randperm(n, generator=generator)
        total_loss = 0.0
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]  # global sample ids of this step's batch
            loss = _step_gradients(block_fn, inputs, targets, weights, local_pos[idx], device, all_reduce,
                                   trainable, epoch)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            total_loss += loss * len(idx)
        history.append(total_loss / n)
        logger.debug("fit_transforms epoch %d: loss %.6g", epoch, history[-1])
    return history


def _check_fit_args(inputs, targets, weights, epochs, batch_size, sample_ids, num_samples) -> int:
    """Validate fit_transforms' arguments; returns the number of samples over all processes."""
    if inputs.shape[0] != targets.shape[0]:
        raise ValueError(f"inputs ({inputs.shape[0]}) and targets ({targets.shape[0]}) differ in length")
    if epochs < 0 or batch_size < 1:
        raise ValueError(f"epochs must be >= 0 and batch_size >= 1, got {epochs}, {batch_size}")
    if weights is not None and weights.dim() == 2 and weights.shape[0] != inputs.shape[0]:
        raise ValueError(f"weights has {weights.shape[0]} rows, inputs has {inputs.shape[0]}")
    if (sample_ids is None) != (num_samples is None):
        raise ValueError("pass sample_ids and num_samples together")
    if sample_ids is None:
        return inputs.shape[0]
    if tuple(sample_ids.shape) != (inputs.shape[0],) or int(num_samples) < inputs.shape[0]:
        n_local = inputs.shape[0]
        raise ValueError(f"sample_ids must have shape ({n_local},) and num_samples >= {n_local}")
    return int(num_samples)


def _step_gradients(block_fn, inputs, targets, weights, pos, device, all_reduce, trainable, epoch) -> float:
    """Gradients of one step's global batch on every process; returns the batch's weighted MSE.

    pos: (b,) local row of each sample of the batch, -1 for rows held by other processes.
    """
    pos = pos[pos >= 0]  # this process's rows of the batch, in batch order
    num = den = torch.zeros((), device=device)
    if len(pos):
        out = block_fn(inputs[pos].to(device))  # (b_local, seq, d_out)
        num_b, den_b = weighted_sq_error(targets[pos].to(device), out, _batch_weights(weights, pos, device))
        num, den = num_b.sum(), den_b.sum()
    totals = torch.stack([num.detach(), den.detach()])  # (2,): Σ w‖Δ‖², Σ w·d over the local rows
    totals = totals if all_reduce is None else all_reduce(totals)  # ... over the whole batch
    if not bool(torch.isfinite(totals).all()) or float(totals[1]) <= 0:
        raise RuntimeError(f"fit_transforms: non-finite loss at epoch {epoch}")
    if len(pos) and float(totals[0]) > 0:
        (num / totals[0]).backward()  # d(loss / loss.detach()) = d(num) / num over the whole batch
    if all_reduce is not None:
        _sum_gradients(trainable, all_reduce)
    return float(totals[0] / totals[1])


def _sum_gradients(trainable: list[nn.Parameter], all_reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Replace every gradient by its sum over processes (one flat all_reduce; missing grads count as 0)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in trainable]
    flat = all_reduce(torch.cat([g.reshape(-1) for g in grads]))  # (total numel,)
    offset = 0
    for p in trainable:
        p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
        offset += p.numel()
