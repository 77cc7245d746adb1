"""Python face of ``torch.ops.sparse_adapt``: public wrappers, fake (meta) kernels and autograd.

The kernels and schemas are C++ (``csrc/``); here each op gets a fake kernel, so that ``torch.compile`` traces it
without running it, and differentiable ops get autograd whose backward is itself a custom op, so the backward
traces too. ``sparse_adapt.reference`` holds the pure-PyTorch definitions the kernels are tested against.
"""

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from . import _native  # noqa: F401  (registers the ops)

_ops = torch.ops.sparse_adapt


# ---------------------------------------------------------------------------------------------------- checks
# The C++ kernels check their arguments themselves; the fakes repeat the shape checks so that a traced model
# fails with the same message at compile time rather than with a shape error deep inside the graph.


def _check(op: str, cond: bool, msg: str) -> None:
    torch._check(cond, lambda: f"sparse_adapt.{op}: {msg}")


_FLOATING = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _check_lora_operands(op: str, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float,
                         mask: Optional[Tensor]) -> None:
    _check(op, weight.dtype in _FLOATING, f"weight must be float32, float64, float16 or bfloat16, got {weight.dtype}")
    _check(op, math.isfinite(scale), f"scale must be finite, got {scale}")
    _check(op, weight.dim() == 2, f"weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
    _check(op, lora_A.dim() == 2, f"lora_A must be 2-D (r, in), got shape {tuple(lora_A.shape)}")
    _check(op, lora_B.dim() == 2, f"lora_B must be 2-D (out, r), got shape {tuple(lora_B.shape)}")
    out, in_ = weight.shape
    r = lora_A.shape[0]
    _check(op, out > 0 and in_ > 0, f"weight is empty, shape {tuple(weight.shape)}; there is nothing to adapt")
    _check(op, r > 0, f"lora_A has rank 0 (shape {tuple(lora_A.shape)}); the rank r must be >= 1")
    _check(op, lora_A.shape[1] == in_, f"lora_A must have shape (r, {in_}) to match weight, got {tuple(lora_A.shape)}")
    _check(op, tuple(lora_B.shape) == (out, r), f"lora_B must have shape ({out}, {r}), got {tuple(lora_B.shape)}")
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        _check_like(op, name, t, weight)
    if mask is not None:
        _check(op, mask.dtype == torch.bool, f"mask must be a bool tensor, got dtype {mask.dtype}")
        _check(op, mask.shape == weight.shape, f"mask must have weight's shape {tuple(weight.shape)}")
        _check(op, mask.device == weight.device, f"mask is on {mask.device} but weight is on {weight.device}")


def _check_like(op: str, name: str, t: Tensor, weight: Tensor) -> None:
    _check(op, t.device == weight.device, f"{name} is on {t.device} but weight is on {weight.device}")
    _check(op, t.dtype == weight.dtype, f"{name} has dtype {t.dtype} but weight has dtype {weight.dtype}")


def _empty(like: Tensor) -> Tensor:
    """What a backward op returns for a gradient it was not asked for."""
    return like.new_empty((0,))


# ------------------------------------------------------------------------------------------------ masked_merge


def masked_merge(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float, mask: Optional[Tensor] = None) -> Tensor:
    """``weight + scale * (lora_B @ lora_A) ⊙ M`` in one pass over ``weight``, ``M = mask`` or ``weight != 0``.

    weight (out, in), lora_A (r, in), lora_B (out, r), mask (out, in) bool. Differentiable w.r.t. all three
    tensors, exactly. No ``(out, in)`` temporary is formed for ``B @ A`` or for the mask.
    """
    return _ops.masked_merge.default(weight, lora_A, lora_B, float(scale), mask)


def masked_merge_(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float, mask: Optional[Tensor] = None) -> None:
    """In-place :func:`masked_merge` (merge; unmerge with ``-scale``). Never makes a zero of ``M`` non-zero."""
    _ops.masked_merge_.default(weight, lora_A, lora_B, float(scale), mask)


@torch.library.register_fake("sparse_adapt::masked_merge")
def _masked_merge_fake(weight, lora_A, lora_B, scale, mask=None):
    _check_lora_operands("masked_merge", weight, lora_A, lora_B, scale, mask)
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


@torch.library.register_fake("sparse_adapt::masked_merge_")
def _masked_merge_inplace_fake(weight, lora_A, lora_B, scale, mask=None):
    _check_lora_operands("masked_merge_", weight, lora_A, lora_B, scale, mask)


@torch.library.register_fake("sparse_adapt::masked_merge_backward")
def _masked_merge_backward_fake(grad, weight, lora_A, lora_B, scale, mask, output_mask):
    _check_lora_operands("masked_merge_backward", weight, lora_A, lora_B, scale, mask)
    _check("masked_merge_backward", grad.shape == weight.shape, "grad must have weight's shape")
    need_A, need_B = output_mask
    return (lora_A.new_empty(lora_A.shape) if need_A else _empty(weight),
            lora_B.new_empty(lora_B.shape) if need_B else _empty(weight))


def _masked_merge_setup_context(ctx, inputs, output):
    weight, lora_A, lora_B, scale, mask = inputs
    ctx.scale = scale
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        # All four are inputs (parameters, buffers): saving them keeps nothing alive that was not already.
        ctx.save_for_backward(weight, lora_A, lora_B, mask)


def _masked_merge_backward(ctx, grad):
    need_w, need_A, need_B = ctx.needs_input_grad[:3]
    grad_A = grad_B = None
    if need_A or need_B:
        weight, lora_A, lora_B, mask = ctx.saved_tensors
        grad_A, grad_B = _ops.masked_merge_backward.default(
            grad, weight, lora_A, lora_B, ctx.scale, mask, [need_A, need_B])
    return (grad if need_w else None, grad_A if need_A else None, grad_B if need_B else None, None, None)


torch.library.register_autograd(
    "sparse_adapt::masked_merge", _masked_merge_backward, setup_context=_masked_merge_setup_context)


# ------------------------------------------------------------------------------------------ masked_lora_linear


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
    """``x @ mergedᵀ + bias`` with ``merged = weight + scale * (lora_B @ lora_A) ⊙ M`` (LoRS).

    x (..., in) -> (..., out). Saves only ``x``, ``weight``, ``lora_A``, ``lora_B`` (and ``mask``) for backward and
    recomputes ``merged`` there. ``exact_grad=False``: the adapters get LoRS's straight-through gradients
    ``gA = s (gy B)ᵀ x``, ``gB = s gyᵀ (x Aᵀ)``, which never form an ``(out, in)`` product; ``exact_grad=True``:
    the exact masked gradients. ``weight`` gets its true gradient ``gyᵀ x`` when it requires grad.
    """
    return _ops.masked_lora_linear.default(x, weight, bias, lora_A, lora_B, float(scale), mask, exact_grad)


@torch.library.register_fake("sparse_adapt::masked_lora_linear")
def _masked_lora_linear_fake(x, weight, bias, lora_A, lora_B, scale, mask=None, exact_grad=False):
    op = "masked_lora_linear"
    _check_lora_operands(op, weight, lora_A, lora_B, scale, mask)
    _check(op, x.dim() >= 1 and x.shape[-1] == weight.shape[1],
           f"x must have shape (..., {weight.shape[1]}) to match weight, got {tuple(x.shape)}")
    _check_like(op, "x", x, weight)
    if bias is not None:
        _check(op, tuple(bias.shape) == (weight.shape[0],), f"bias must have shape ({weight.shape[0]},)")
        _check_like(op, "bias", bias, weight)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake("sparse_adapt::masked_lora_linear_backward")
def _masked_lora_linear_backward_fake(grad_out, x, weight, lora_A, lora_B, scale, mask, exact_grad, output_mask):
    _check_lora_operands("masked_lora_linear_backward", weight, lora_A, lora_B, scale, mask)
    need_x, need_w, need_bias, need_A, need_B = output_mask
    shapes = (
        (*grad_out.shape[:-1], weight.shape[1]) if need_x else None,
        weight.shape if need_w else None,
        (weight.shape[0],) if need_bias else None,
        lora_A.shape if need_A else None,
        lora_B.shape if need_B else None,
    )
    return tuple(weight.new_empty(s) if s is not None else _empty(weight) for s in shapes)


def _needs_x(needs_input_grad: Sequence[bool]) -> bool:
    # x enters the gradients of weight, lora_A and lora_B; grad_x itself needs only weight and the adapters.
    return needs_input_grad[1] or needs_input_grad[3] or needs_input_grad[4]


def _masked_lora_linear_setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scale, mask, exact_grad = inputs
    ctx.scale, ctx.exact_grad = scale, exact_grad
    ctx.x_shape = x.shape
    # Only the inputs are saved -- never the merged weight, which backward recomputes.
    ctx.save_for_backward(x if _needs_x(ctx.needs_input_grad) else None, weight, lora_A, lora_B, mask)


def _masked_lora_linear_backward(ctx, grad_out):
    x, weight, lora_A, lora_B, mask = ctx.saved_tensors
    need = list(ctx.needs_input_grad[:5])
    if x is None:  # not saved, as no wanted gradient needs it: the op only reads its shape
        x = grad_out.new_zeros(()).expand(ctx.x_shape)
    grads = _ops.masked_lora_linear_backward.default(
        grad_out, x, weight, lora_A, lora_B, ctx.scale, mask, ctx.exact_grad, need)
    return (*(g if n else None for g, n in zip(grads, need)), None, None, None)


torch.library.register_autograd(
    "sparse_adapt::masked_lora_linear", _masked_lora_linear_backward, setup_context=_masked_lora_linear_setup_context)


# --------------------------------------------------------------------------------------------------- ema_topk_


def ema_topk_(param: Tensor, grad: Tensor, score: Tensor, beta: float, k: int, dim: int) -> None:
    """RoseLoRA's sensitivity-based pruning step, in place, in one fused pass per matrix.

    ``score ← beta·score + (1−beta)·|param ⊙ grad|`` (score is float32, param's shape); then along ``dim`` every
    slice of ``param`` keeps its ``k`` entries of largest score and the rest are set to 0. Ties go to the lower
    index (a NaN score ranks lowest), so CPU and CUDA pick the same entries. ``dim=1`` on ``lora_A (r, in)``
    prunes each row, ``dim=0`` on ``lora_B (out, r)`` each column. Not differentiable: it runs under no_grad.
    """
    with torch.no_grad():
        _ops.ema_topk_.default(param, grad, score, float(beta), int(k), int(dim))


@torch.library.register_fake("sparse_adapt::ema_topk_")
def _ema_topk_fake(param, grad, score, beta, k, dim):
    op = "ema_topk_"
    _check(op, param.dtype in _FLOATING, f"param must be float32, float64, float16 or bfloat16, got {param.dtype}")
    _check(op, param.dim() == 2, f"param must be 2-D, got shape {tuple(param.shape)}")
    _check(op, grad.shape == param.shape, f"grad must have param's shape {tuple(param.shape)}")
    _check_like(op, "grad", grad, param)
    _check(op, score.dtype == torch.float32, f"score must be float32, got {score.dtype}")
    _check(op, score.shape == param.shape, f"score must have param's shape {tuple(param.shape)}")
    _check(op, score.device == param.device, f"score is on {score.device} but param is on {param.device}")
    _check(op, -2 <= dim <= 1, f"dim must be 0 (per column) or 1 (per row) of the 2-D param, got {dim}")
    _check(op, 0.0 <= beta <= 1.0, f"beta must be in [0, 1], got {beta}")
    n = param.shape[dim]
    _check(op, 0 <= k <= n, f"k must be in [0, {n}], got {k}")
