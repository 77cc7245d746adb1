"""Pure-PyTorch references of every native op: the definitions the kernels are tested against.

They are written for clarity, not speed: each builds the ``(out, in)`` temporaries the kernels avoid.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def merge_mask(weight: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """M: the explicit mask, else the weight's own non-zeros."""
    return weight != 0 if mask is None else mask


def masked_merge(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float, mask: Optional[Tensor] = None) -> Tensor:
    """``weight + scale * (lora_B @ lora_A) ⊙ M``; differentiable, with the exact gradients."""
    return weight + scale * (lora_B @ lora_A) * merge_mask(weight, mask)


def _straight_through(t: Tensor) -> Tensor:
    """Zero in value, ``t``'s gradient in backward."""
    return t - t.detach()


def masked_lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    scale: float,
    mask: Optional[Tensor] = None,
    exact_grad: bool = False,
) -> Tensor:
    """``x @ mergedᵀ + bias``.

    With ``exact_grad=True`` autograd gives the exact gradients of the masked merge. With ``exact_grad=False``
    the adapter gradients are LoRS's straight-through estimate, which equals plain LoRA's adapter gradient
    (the mask is ignored in backward): ``gA = s·(gy B)ᵀ x``, ``gB = s·gyᵀ (x Aᵀ)``. ``x``, ``weight`` and
    ``bias`` get their true gradients either way.
    """
    if exact_grad:
        return F.linear(x, masked_merge(weight, lora_A, lora_B, scale, mask), bias)
    delta = (scale * (lora_B @ lora_A) * merge_mask(weight, mask)).detach()
    lora = scale * F.linear(F.linear(x.detach(), lora_A), lora_B)
    return F.linear(x, weight + delta, bias) + _straight_through(lora)


def ordered_score(score: Tensor) -> Tensor:
    """The kernels' ranking key of a float32 score as an int64 of the same order: -inf < ... < -0 == +0 < ... < +inf,
    and NaN (of either sign) below everything."""
    s = score.float()
    magnitude = s.abs().view(torch.int32).to(torch.int64)
    key = torch.where(s < 0, (1 << 31) - 1 - magnitude, (1 << 31) + magnitude)
    return torch.where(torch.isnan(s), torch.zeros_like(key), key)


def topk_keep_mask(score: Tensor, k: int, dim: int) -> Tensor:
    """Bool mask of the k largest scores of every slice along dim; ties go to the lower index, NaN ranks lowest."""
    order = torch.sort(ordered_score(score), dim=dim, descending=True, stable=True).indices
    keep = torch.zeros_like(score, dtype=torch.bool)
    return keep.scatter_(dim, order.narrow(dim, 0, k), True)


def ema_topk_(param: Tensor, grad: Tensor, score: Tensor, beta: float, k: int, dim: int) -> None:
    """In place: ``score ← β·score + (1−β)·|param ⊙ grad|``, then keep the top-k of each slice of param along dim."""
    with torch.no_grad():
        acc = torch.float64 if param.dtype == torch.float64 else torch.float32
        sensitivity = (param.to(acc) * grad.to(acc)).abs().float()
        score.copy_(beta * score + (1 - beta) * sensitivity)
        param.masked_fill_(~topk_keep_mask(score, k, dim), 0)
