"""The argument checks of csrc/common/checks.cpp, line for line, for the fake kernels: a traced or compiled call
refuses exactly what the kernels refuse, with exactly their message and exception type (tests/test_errors.py
compares them). Keep the two files in step: same checks, same order, same words. (check_in_place_operands, the
in-place ops' checks of grad mode, inference tensors and shared memory, is not mirrored: it concerns run-time state
that a traced, functionalized graph does not have.)"""

import math
from typing import Optional

import torch
from torch import Tensor

FLOATING = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

# How c10 prints a ScalarType.
_DTYPE_NAMES = {torch.float32: "Float", torch.float64: "Double", torch.float16: "Half", torch.bfloat16: "BFloat16",
                torch.int64: "Long", torch.int32: "Int", torch.int16: "Short", torch.int8: "Char",
                torch.uint8: "Byte", torch.bool: "Bool", torch.complex64: "ComplexFloat",
                torch.complex128: "ComplexDouble"}


def dtype_str(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def shape_str(t: Tensor) -> str:
    """'(4, 8)', '(4,)', '()', as shape_str in checks.cpp."""
    dims = [str(d) for d in t.shape]
    return "(" + ", ".join(dims) + (",)" if len(dims) == 1 else ")")


def number_str(x: float) -> str:
    """A double as a C++ ostream prints it (6 significant digits)."""
    return f"{x:g}"


def fail_unless(cond, op: str, *parts, value_error: bool = False) -> None:
    """TORCH_CHECK (RuntimeError) / TORCH_CHECK_VALUE (ValueError); the message is built only on failure."""
    check = torch._check_value if value_error else torch._check
    check(cond, lambda: "sparse_adapt." + op + ": " + "".join(str(p) for p in parts))


def check_floating(op: str, name: str, t: Tensor) -> None:
    fail_unless(t.dtype in FLOATING, op, name, " must be float32, float64, float16 or bfloat16, got ",
                dtype_str(t.dtype))


def check_floating_dtype(op: str, name: str, dtype: torch.dtype) -> None:
    fail_unless(dtype in FLOATING, op, name, " must be float32, float64, float16 or bfloat16, got ", dtype_str(dtype),
                value_error=True)


def check_like(op: str, name: str, t: Tensor, ref_name: str, ref: Tensor, any_dtype: bool = False) -> None:
    fail_unless(t.device == ref.device, op, name, " is on ", t.device, " but ", ref_name, " is on ", ref.device,
                "; all operands must be on one device")
    fail_unless(any_dtype or t.dtype == ref.dtype, op, name, " has dtype ", dtype_str(t.dtype), " but ", ref_name,
                " has dtype ", dtype_str(ref.dtype),
                "; cast them to one dtype (mixed precision: run under torch.autocast)")


def check_lora_operands(op: str, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float,
                        mask: Optional[Tensor], mixed: bool = False) -> None:
    check_floating(op, "weight", weight)
    check_floating(op, "lora_A", lora_A)
    check_floating(op, "lora_B", lora_B)
    fail_unless(weight.dim() == 2, op, "weight must be 2-D (out, in), got shape ", shape_str(weight))
    fail_unless(lora_A.dim() == 2, op, "lora_A must be 2-D (r, in), got shape ", shape_str(lora_A))
    fail_unless(lora_B.dim() == 2, op, "lora_B must be 2-D (out, r), got shape ", shape_str(lora_B))
    out, in_ = weight.shape
    r = lora_A.shape[0]
    fail_unless(out > 0 and in_ > 0, op, "weight is empty, shape ", shape_str(weight), "; there is nothing to adapt")
    fail_unless(r > 0, op, "lora_A has rank 0 (shape ", shape_str(lora_A), "); the rank r must be >= 1")
    fail_unless(lora_A.shape[1] == in_, op, "lora_A must have shape (r, in) = (r, ", in_, ") to match weight ",
                shape_str(weight), ", got ", shape_str(lora_A))
    fail_unless(lora_B.shape[0] == out and lora_B.shape[1] == r, op, "lora_B must have shape (out, r) = (", out, ", ",
                r, ") to match weight ", shape_str(weight), " and lora_A ", shape_str(lora_A), ", got ",
                shape_str(lora_B))
    check_like(op, "lora_A", lora_A, "weight", weight, mixed)
    check_like(op, "lora_B", lora_B, "weight", weight, mixed)
    fail_unless(math.isfinite(scale), op, "scale must be finite, got ", number_str(scale), value_error=True)
    if mask is not None:
        fail_unless(mask.dtype == torch.bool, op, "mask must be a bool tensor, got dtype ", dtype_str(mask.dtype),
                    " (use mask.bool() or weight != 0)")
        fail_unless(mask.shape == weight.shape, op, "mask must have weight's shape ", shape_str(weight), ", got ",
                    shape_str(mask))
        fail_unless(mask.device == weight.device, op, "mask is on ", mask.device, " but weight is on ", weight.device)


def check_linear_input(op: str, x: Tensor, bias: Optional[Tensor], weight: Tensor,
                       compute_dtype: Optional[torch.dtype] = None) -> None:
    check_floating(op, "x", x)
    out, in_ = weight.shape
    fail_unless(x.dim() >= 1 and x.shape[-1] == in_, op, "x must have shape (..., in) = (..., ", in_,
                ") to match weight ", shape_str(weight), ", got ", shape_str(x))
    if compute_dtype is not None:
        check_floating_dtype(op, "compute_dtype", compute_dtype)
        check_like(op, "x", x, "weight", weight, any_dtype=True)
        fail_unless(x.dtype == compute_dtype, op, "x has dtype ", dtype_str(x.dtype), " but compute_dtype is ",
                    dtype_str(compute_dtype), "; x must be in the compute dtype")
    else:
        check_like(op, "x", x, "weight", weight)
    if bias is not None:
        check_floating(op, "bias", bias)
        fail_unless(bias.dim() == 1 and bias.shape[0] == out, op, "bias must have shape (out,) = (", out,
                    ",) to match weight ", shape_str(weight), ", got ", shape_str(bias))
        check_like(op, "bias", bias, "weight", weight, compute_dtype is not None)


def check_ema_topk_operands(op: str, param: Tensor, grad: Tensor, score: Tensor, beta: float, k: int, dim: int,
                            index: int = -1) -> int:
    p, g, s = (("param", "grad", "score") if index < 0
               else (f"params[{index}]", f"grads[{index}]", f"scores[{index}]"))
    fail_unless(param.dtype in FLOATING, op, p, " must be float32, float64, float16 or bfloat16, got ",
                dtype_str(param.dtype))
    fail_unless(param.dim() == 2, op, p, " must be 2-D, got shape ", shape_str(param))
    fail_unless(param.numel() > 0, op, p, " is empty, shape ", shape_str(param))
    fail_unless(grad.shape == param.shape, op, g, " must have ", p, "'s shape ", shape_str(param), ", got ",
                shape_str(grad))
    fail_unless(grad.device == param.device, op, g, " is on ", grad.device, " but ", p, " is on ", param.device,
                "; all operands must be on one device")
    fail_unless(grad.dtype == param.dtype, op, g, " has dtype ", dtype_str(grad.dtype), " but ", p, " has dtype ",
                dtype_str(param.dtype), "; cast them to one dtype")
    fail_unless(score.dtype == torch.float32, op, s, " must be float32 (it accumulates an EMA), got ",
                dtype_str(score.dtype))
    fail_unless(score.shape == param.shape, op, s, " must have ", p, "'s shape ", shape_str(param), ", got ",
                shape_str(score))
    fail_unless(score.device == param.device, op, s, " is on ", score.device, " but ", p, " is on ", param.device)
    fail_unless(score is not param and score is not grad, op, s, " must be its own tensor")
    fail_unless(-2 <= dim <= 1, op, "dim must be 0 (per column) or 1 (per row) of the 2-D ", p, ", got ", dim,
                value_error=True)
    fail_unless(0.0 <= beta <= 1.0, op, "beta must be in [0, 1], got ", number_str(beta), value_error=True)
    d = dim + 2 if dim < 0 else dim
    n = param.shape[d]
    fail_unless(0 <= k <= n, op, "k must be in [0, ", n, "] (the length of ", p, " ", shape_str(param), " along dim ",
                dim, "), got ", k, value_error=True)
    return d
