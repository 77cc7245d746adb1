"""Inputs and tolerances shared by the op tests."""

from typing import Optional

import torch
from torch import Tensor

LOW_PRECISION = (torch.float16, torch.bfloat16)
ALL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def nm_mask(out: int, in_: int, n: int, m: int, generator: torch.Generator) -> Tensor:
    """A random N:M mask: in each group of m consecutive inputs of a row, exactly n are kept."""
    assert in_ % m == 0
    scores = torch.rand(out, in_ // m, m, generator=generator)
    keep = scores.argsort(dim=-1)[..., :n]
    mask = torch.zeros(out, in_ // m, m, dtype=torch.bool)
    mask.scatter_(-1, keep, True)
    return mask.reshape(out, in_)


def sparse_weight(out: int, in_: int, sparsity: float, generator: torch.Generator,
                  pattern: str = "unstructured") -> Tensor:
    """A float32 weight whose zeros are the pruned entries (pattern "unstructured" or "2:4")."""
    w = torch.randn(out, in_, generator=generator)
    if pattern == "2:4":
        return w * nm_mask(out, in_, 2, 4, generator)
    return w * (torch.rand(out, in_, generator=generator) >= sparsity)


def lora_operands(out, in_, r, *, dtype=torch.float32, device="cpu", seed=0, sparsity=0.5, pattern="unstructured",
                  explicit_mask=False):
    """(weight, lora_A, lora_B, mask): B is non-zero, so the merge really moves the weights."""
    g = torch.Generator().manual_seed(seed)
    w = sparse_weight(out, in_, sparsity, g, pattern)
    a = torch.randn(r, in_, generator=g) / r ** 0.5
    b = torch.randn(out, r, generator=g) / r ** 0.5
    mask: Optional[Tensor] = None
    if explicit_mask:
        # An explicit mask that differs from weight != 0, so that using the wrong one is caught.
        mask = (w != 0) & (torch.rand(out, in_, generator=g) > 0.25)
        mask = mask.to(device)
    return w.to(device, dtype), a.to(device, dtype), b.to(device, dtype), mask


def cpu(*tensors):
    """The tensors moved to the CPU (None stays None), to compare a device's result with the CPU reference."""
    return [t.cpu() if t is not None else None for t in tensors]


def lowprec_slack(dtype: torch.dtype, ref: Tensor) -> float:
    """Two roundings at the largest magnitude: on small tensors the 2x-of-PyTorch rule alone measures luck."""
    return 2 * torch.finfo(dtype).eps * absmax(ref)


def absmax(t: Tensor) -> float:
    return t.abs().max().item() if t.numel() else 0.0


def assert_close_to_reference(out: Tensor, ref_fn, inputs, name: str = "output"):
    """Compare against the reference run in float64; for low precision, use the flash-attention rule:
    the error may be at most twice the error of the same reference computed by PyTorch in that precision."""
    ref64 = ref_fn(*[t.double() if isinstance(t, Tensor) and t.is_floating_point() else t for t in inputs])
    if out.dtype in LOW_PRECISION:
        ref_low = ref_fn(*inputs)
        err = absmax(out.double() - ref64)
        base = absmax(ref_low.double() - ref64)
        assert err <= 2 * base + lowprec_slack(out.dtype, ref64), f"{name}: error {err} vs PyTorch's {base}"
    else:
        tol = 1e-10 if out.dtype == torch.float64 else 2e-5
        torch.testing.assert_close(out.double(), ref64, rtol=tol, atol=tol * max(1.0, absmax(ref64)),
                                   msg=lambda m: f"{name}: {m}")


def _leaves(inputs, wrt):
    return [t.detach().clone().requires_grad_(i in wrt) if isinstance(t, Tensor) and t.is_floating_point() else t
            for i, t in enumerate(inputs)]


def grads_of(fn, inputs, wrt, grad_out: Tensor):
    """(output, [grad of inputs[i] for i in wrt]) of fn on fresh leaf copies of inputs."""
    leaves = _leaves(inputs, wrt)
    out = fn(*leaves)
    grads = torch.autograd.grad(out, [leaves[i] for i in wrt], grad_out.to(out.dtype))
    return out, list(grads)


def assert_grads_match_reference(fn, ref_fn, inputs, wrt, seed: int = 1):
    """Output and gradients of fn against ref_fn (float64; for low precision the 2x-of-PyTorch rule)."""
    out = fn(*inputs)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.device)
    out, grads = grads_of(fn, inputs, wrt, grad_out)
    inputs64 = [t.double() if isinstance(t, Tensor) and t.is_floating_point() else t for t in inputs]
    ref_out, ref_grads = grads_of(ref_fn, inputs64, wrt, grad_out.double())
    low = out.dtype in LOW_PRECISION
    if low:
        _, low_grads = grads_of(ref_fn, inputs, wrt, grad_out)
    for k, (g, ref) in enumerate(zip(grads, ref_grads)):
        name = f"grad of input {wrt[k]}"
        assert g.shape == ref.shape, f"{name}: shape {tuple(g.shape)} != {tuple(ref.shape)}"
        if low:
            err = absmax(g.double() - ref)
            base = absmax(low_grads[k].double() - ref)
            assert err <= 2 * base + lowprec_slack(g.dtype, ref), f"{name}: error {err} vs PyTorch's {base}"
        else:
            tol = 1e-10 if g.dtype == torch.float64 else 5e-5
            torch.testing.assert_close(g.double(), ref, rtol=tol, atol=tol * max(1.0, absmax(ref)),
                                       msg=lambda m, name=name: f"{name}: {m}")
