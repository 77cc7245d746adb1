"""Python face of ``torch.ops.sparse_adapt``: public wrappers, fake (meta) kernels and autograd.

The kernels and schemas are C++ (``csrc/``); here each op gets a fake kernel, so that ``torch.compile`` traces it
without running it, and differentiable ops get autograd whose backward is itself a custom op, so the backward
traces too. ``sparse_adapt.reference`` holds the pure-PyTorch definitions the kernels are tested against.
"""

import operator
from typing import Optional, Sequence

import torch
from torch import Tensor

from . import _native  # noqa: F401  (registers the ops)
from ._checks import (
    check_ema_topk_operands,
    check_floating,
    check_floating_dtype,
    check_like,
    check_linear_input,
    check_lora_operands,
    fail_unless,
    shape_str,
)

_ops = torch.ops.sparse_adapt


# The C++ kernels check their arguments themselves; the fakes run the same checks (_checks.py mirrors
# csrc/common/checks.cpp), so that a traced model fails at compile time with the kernels' own message rather than
# with a shape error deep inside the graph.

def _empty(like: Tensor) -> Tensor:
    """What a backward op returns for a gradient it was not asked for."""
    return like.new_empty((0,))


# ------------------------------------------------------------------------------------------------ masked_merge


def masked_merge(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float, mask: Optional[Tensor] = None,
                 out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """``weight + scale * (lora_B @ lora_A) ⊙ M`` in one pass over ``weight``, ``M = mask`` or ``weight != 0``.

    weight (out, in), lora_A (r, in), lora_B (out, r), mask (out, in) bool. Differentiable w.r.t. all three
    tensors, exactly. No ``(out, in)`` temporary is formed for ``B @ A`` or for the mask. ``out_dtype``: the
    result's dtype (default: weight's); with it the three may be stored in any floating dtypes, each read in its
    own (e.g. an fp32 weight and adapters merged straight into a bf16 weight, with no cast pass).
    """
    return _ops.masked_merge.default(weight, lora_A, lora_B, float(scale), mask, out_dtype)


def masked_merge_(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float, mask: Optional[Tensor] = None) -> None:
    """In-place :func:`masked_merge` (merge; unmerge with ``-scale``). Never makes a zero of ``M`` non-zero, nor a
    non-zero weight zero (a kept weight whose sum rounds to 0 becomes the dtype's smallest normal number), so an
    unmerge restores the zero pattern exactly. Not differentiable: call it under ``torch.no_grad()`` when any
    operand requires grad. Refuses ``lora_A``/``lora_B``/``mask`` that share memory with ``weight``."""
    _ops.masked_merge_.default(weight, lora_A, lora_B, float(scale), mask)


@torch.library.register_fake("sparse_adapt::masked_merge")
def _masked_merge_fake(weight, lora_A, lora_B, scale, mask=None, out_dtype=None):
    check_lora_operands("masked_merge", weight, lora_A, lora_B, scale, mask, mixed=out_dtype is not None)
    if out_dtype is not None:
        check_floating_dtype("masked_merge", "out_dtype", out_dtype)
    return torch.empty_like(weight, dtype=out_dtype or weight.dtype, memory_format=torch.contiguous_format)


@torch.library.register_fake("sparse_adapt::masked_merge_")
def _masked_merge_inplace_fake(weight, lora_A, lora_B, scale, mask=None):
    check_lora_operands("masked_merge_", weight, lora_A, lora_B, scale, mask)


@torch.library.register_fake("sparse_adapt::masked_merge_backward")
def _masked_merge_backward_fake(grad, weight, lora_A, lora_B, scale, mask, output_mask):
    op = "masked_merge_backward"
    check_lora_operands(op, weight, lora_A, lora_B, scale, mask, mixed=True)
    check_floating(op, "grad", grad)
    check_like(op, "grad", grad, "weight", weight, any_dtype=True)
    fail_unless(grad.shape == weight.shape, op, "grad must have weight's shape ", shape_str(weight), ", got ",
                shape_str(grad))
    need_A, need_B = output_mask
    return (lora_A.new_empty(lora_A.shape) if need_A else _empty(lora_A),
            lora_B.new_empty(lora_B.shape) if need_B else _empty(lora_B))


def _masked_merge_setup_context(ctx, inputs, output):
    weight, lora_A, lora_B, scale, mask, out_dtype = inputs
    ctx.scale = scale
    ctx.weight_dtype = weight.dtype
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
    return (grad.to(ctx.weight_dtype) if need_w else None, grad_A if need_A else None, grad_B if need_B else None,
            None, None, None)


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
    compute_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """``x @ mergedᵀ + bias`` with ``merged = weight + scale * (lora_B @ lora_A) ⊙ M`` (LoRS).

    x (..., in) -> (..., out). Saves only ``x``, ``weight``, ``lora_A``, ``lora_B`` (and ``mask``) for backward and
    recomputes ``merged`` there. ``exact_grad=False``: the adapters get LoRS's straight-through gradients
    ``gA = s (gy B)ᵀ x``, ``gB = s gyᵀ (x Aᵀ)``, which never form an ``(out, in)`` product; ``exact_grad=True``:
    the exact masked gradients. ``weight`` gets its true gradient ``gyᵀ x`` when it requires grad.

    Under ``torch.autocast`` it behaves as ``F.linear`` does: ``x`` and ``bias`` are cast to the autocast dtype and
    the output is in it, but ``weight`` and the adapters are read in their own dtypes by the merge, which writes
    the merged weight straight in the compute dtype; each gradient has its operand's dtype. ``compute_dtype`` asks
    for the same explicitly (``x`` must then be in it).
    """
    return _ops.masked_lora_linear.default(x, weight, bias, lora_A, lora_B, float(scale), mask, exact_grad,
                                           compute_dtype)


@torch.library.register_fake("sparse_adapt::masked_lora_linear")
def _masked_lora_linear_fake(x, weight, bias, lora_A, lora_B, scale, mask=None, exact_grad=False, compute_dtype=None):
    op = "masked_lora_linear"
    check_lora_operands(op, weight, lora_A, lora_B, scale, mask, mixed=compute_dtype is not None)
    check_linear_input(op, x, bias, weight, compute_dtype)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake("sparse_adapt::masked_lora_linear_backward")
def _masked_lora_linear_backward_fake(grad_out, x, weight, lora_A, lora_B, scale, mask, exact_grad, output_mask,
                                      compute_dtype=None):
    op = "masked_lora_linear_backward"
    check_lora_operands(op, weight, lora_A, lora_B, scale, mask, mixed=compute_dtype is not None)
    check_linear_input(op, x, None, weight, compute_dtype)
    check_floating(op, "grad_out", grad_out)
    check_like(op, "grad_out", grad_out, "x", x)
    expected = [*x.shape[:-1], weight.shape[0]]
    fail_unless(list(grad_out.shape) == expected, op, "grad_out must have shape (..., out) = [",
                ", ".join(str(d) for d in expected), "] to match x ", shape_str(x), " and weight ", shape_str(weight),
                ", got ", shape_str(grad_out))
    need_x, need_w, need_bias, need_A, need_B = output_mask
    grads = (
        (x, (*grad_out.shape[:-1], weight.shape[1]) if need_x else None),
        (weight, weight.shape if need_w else None),
        (x, (weight.shape[0],) if need_bias else None),
        (lora_A, lora_A.shape if need_A else None),
        (lora_B, lora_B.shape if need_B else None),
    )
    return tuple(like.new_empty(s) if s is not None else _empty(like) for like, s in grads)


def _needs_x(needs_input_grad: Sequence[bool]) -> bool:
    # x enters the gradients of weight, lora_A and lora_B; grad_x itself needs only weight and the adapters.
    return needs_input_grad[1] or needs_input_grad[3] or needs_input_grad[4]


def _masked_lora_linear_setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scale, mask, exact_grad, compute_dtype = inputs
    ctx.scale, ctx.exact_grad, ctx.compute_dtype = scale, exact_grad, compute_dtype
    ctx.x_shape = x.shape
    ctx.bias_dtype = bias.dtype if bias is not None else None
    # Only the inputs are saved -- never the merged weight, which backward recomputes.
    ctx.save_for_backward(x if _needs_x(ctx.needs_input_grad) else None, weight, lora_A, lora_B, mask)


def _masked_lora_linear_backward(ctx, grad_out):
    x, weight, lora_A, lora_B, mask = ctx.saved_tensors
    need = list(ctx.needs_input_grad[:5])
    if x is None:  # not saved, as no wanted gradient needs it: the op only reads its shape (and dtype)
        x = grad_out.new_zeros(()).expand(ctx.x_shape)
    grad_x, grad_w, grad_bias, grad_A, grad_B = _ops.masked_lora_linear_backward.default(
        grad_out, x, weight, lora_A, lora_B, ctx.scale, mask, ctx.exact_grad, need, ctx.compute_dtype)
    if need[2]:
        grad_bias = grad_bias.to(ctx.bias_dtype)  # the compute dtype's sum, in bias's own dtype
    grads = (grad_x, grad_w, grad_bias, grad_A, grad_B)
    return (*(g if n else None for g, n in zip(grads, need)), None, None, None, None)


torch.library.register_autograd(
    "sparse_adapt::masked_lora_linear", _masked_lora_linear_backward, setup_context=_masked_lora_linear_setup_context)


# --------------------------------------------------------------------------------------------------- ema_topk_


def _integer(name: str, value) -> int:
    """An int argument as the op takes it: a float or bool is refused, not truncated."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}") from None


def ema_topk_(param: Tensor, grad: Tensor, score: Tensor, beta: float, k: int, dim: int) -> None:
    """RoseLoRA's sensitivity-based pruning step, in place, in one fused pass per matrix.

    ``score ← beta·score + (1−beta)·|param ⊙ grad|`` (score is float32, param's shape); then along ``dim`` every
    slice of ``param`` keeps its ``k`` entries of largest score and the rest are set to 0. Ties go to the lower
    index (a NaN score ranks lowest), so CPU and CUDA pick the same entries. ``dim=1`` on ``lora_A (r, in)``
    prunes each row, ``dim=0`` on ``lora_B (out, r)`` each column. Not differentiable: as for torch's own in-place
    ops, call it under ``torch.no_grad()`` when ``param`` requires grad.
    """
    _ops.ema_topk_.default(param, grad, score, float(beta), _integer("k", k), _integer("dim", dim))


@torch.library.register_fake("sparse_adapt::ema_topk_")
def _ema_topk_fake(param, grad, score, beta, k, dim):
    check_ema_topk_operands("ema_topk_", param, grad, score, beta, k, dim)


def ema_topk_multi_(params: Sequence[Tensor], grads: Sequence[Tensor], scores: Sequence[Tensor], beta: float,
                    ks: Sequence[int], dims: Sequence[int]) -> None:
    """:func:`ema_topk_` on many matrices in one call: ``params[i]`` keeps ``ks[i]`` entries per slice along
    ``dims[i]``. Every matrix is checked before any is changed; on CUDA they share one kernel launch per 48 matrices
    (per dtype), which is what makes RoseLoRA's per-step pruning of hundreds of adapters cheap."""
    _ops.ema_topk_multi_.default(list(params), list(grads), list(scores), float(beta),
                                 [_integer(f"ks[{i}]", k) for i, k in enumerate(ks)],
                                 [_integer(f"dims[{i}]", d) for i, d in enumerate(dims)])


@torch.library.register_fake("sparse_adapt::ema_topk_multi_")
def _ema_topk_multi_fake(params, grads, scores, beta, ks, dims):
    op = "ema_topk_multi_"
    n = len(params)
    fail_unless(len(grads) == n and len(scores) == n and len(ks) == n and len(dims) == n, op,
                "params, grads, scores, ks and dims must have one entry per matrix, got ", n, ", ", len(grads), ", ",
                len(scores), ", ", len(ks), " and ", len(dims), value_error=True)
    for i in range(n):
        check_ema_topk_operands(op, params[i], grads[i], scores[i], beta, ks[i], dims[i], i)
