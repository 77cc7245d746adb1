"""masked_merge / masked_merge_ against the reference: values, gradients, zero pattern, gradcheck, opcheck."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import sparse_adapt as sa
from sparse_adapt import reference

from helpers import ALL_DTYPES, absmax, assert_close_to_reference, assert_grads_match_reference, cpu, lora_operands

SHAPES = [(1, 1, 1), (7, 13, 3), (64, 64, 16), (33, 300, 8), (130, 257, 64), (40, 24, 32)]
OPS = torch.ops.sparse_adapt


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("out,in_,r", SHAPES)
@pytest.mark.parametrize("explicit_mask", [False, True])
def test_matches_reference(device, dtype, out, in_, r, explicit_mask):
    w, a, b, mask = lora_operands(out, in_, r, dtype=dtype, device=device, explicit_mask=explicit_mask)
    merged = sa.masked_merge(w, a, b, 0.75, mask)
    assert merged.dtype == dtype and merged.shape == w.shape and merged.is_contiguous()
    w, a, b, mask = cpu(w, a, b, mask)
    assert_close_to_reference(merged.cpu(), reference.masked_merge, [w, a, b, 0.75, mask])


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_zero_pattern_is_exactly_preserved(device, dtype, pattern):
    w, a, b, _ = lora_operands(96, 128, 16, dtype=dtype, device=device, pattern=pattern)
    b.mul_(100)  # a large update: any leak into a pruned position would show
    merged = sa.masked_merge(w, a, b, 2.0)
    assert torch.equal(merged == 0, w == 0)
    changed = merged != w
    assert changed[w != 0].float().mean() > 0.99  # and the kept weights really moved


def test_explicit_mask_wins_over_weight_zeros(device):
    w, a, b, _ = lora_operands(16, 32, 4, device=device)
    mask = torch.zeros_like(w, dtype=torch.bool)
    mask[::2] = True  # includes zeros of w: they may become non-zero, as the caller asked
    merged = sa.masked_merge(w, a, b, 1.0, mask)
    assert torch.equal(merged[~mask], w[~mask])
    torch.testing.assert_close(merged, reference.masked_merge(w, a, b, 1.0, mask))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("explicit_mask", [False, True])
def test_gradients_match_reference(device, dtype, explicit_mask):
    w, a, b, mask = lora_operands(45, 70, 6, dtype=dtype, device=device, explicit_mask=explicit_mask)
    for wrt in ([0, 1, 2], [1], [2], [0]):
        assert_grads_match_reference(sa.masked_merge, reference.masked_merge, [w, a, b, 0.5, mask], wrt)


def test_non_contiguous_inputs(device):
    w, a, b, _ = lora_operands(48, 40, 8, device=device)
    wt = w.t().contiguous().t()            # (48, 40) with column-major strides
    at = a.t().contiguous().t()
    bs = torch.stack([b, torch.zeros_like(b)], dim=-1).flatten(1)[:, ::2]  # b, as a stride-2 view
    assert torch.equal(bs, b) and not (wt.is_contiguous() or at.is_contiguous() or bs.is_contiguous())
    torch.testing.assert_close(sa.masked_merge(wt, at, bs, 0.3), reference.masked_merge(w, a, b, 0.3))


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_inplace_merge_then_unmerge(device, dtype):
    w, a, b, _ = lora_operands(70, 90, 8, dtype=dtype, device=device)
    original = w.clone()
    sa.masked_merge_(w, a, b, 1.5)
    torch.testing.assert_close(w, sa.masked_merge(original, a, b, 1.5), rtol=0, atol=0)
    sa.masked_merge_(w, a, b, -1.5)
    assert torch.equal(w == 0, original == 0)
    tol = {torch.float16: 5e-3, torch.bfloat16: 3e-2}.get(dtype, 1e-5)
    torch.testing.assert_close(w, original, rtol=tol, atol=tol)


def test_inplace_on_non_contiguous_weight(device):
    w, a, b, _ = lora_operands(30, 20, 4, device=device)
    expected = reference.masked_merge(w, a, b, 0.9)
    holder = w.t().contiguous()
    view = holder.t()  # the caller's (30, 20) view of column-major storage
    sa.masked_merge_(view, a, b, 0.9)
    torch.testing.assert_close(view, expected)
    torch.testing.assert_close(holder, expected.t())


@given(out=st.integers(1, 70), in_=st.integers(1, 70), r=st.integers(1, 40), scale=st.floats(-4, 4),
       sparsity=st.sampled_from([0.0, 0.5, 0.9, 1.0]), seed=st.integers(0, 2**16))
def test_hypothesis_shapes(out, in_, r, scale, sparsity, seed):
    w, a, b, _ = lora_operands(out, in_, r, seed=seed, sparsity=sparsity, dtype=torch.float64)
    merged = sa.masked_merge(w, a, b, scale)
    torch.testing.assert_close(merged, reference.masked_merge(w, a, b, scale), rtol=1e-12, atol=1e-12)
    assert torch.equal(merged[w == 0], w[w == 0])


def test_gradcheck_float64():
    w, a, b, mask = lora_operands(9, 11, 3, dtype=torch.float64)
    for m in (None, mask):
        inputs = (w.requires_grad_(), a.requires_grad_(), b.requires_grad_(), 0.7, m)
        assert torch.autograd.gradcheck(sa.masked_merge, inputs)


@pytest.mark.parametrize("explicit_mask", [False, True])
def test_opcheck(device, explicit_mask):
    w, a, b, mask = lora_operands(12, 20, 4, device=device, explicit_mask=explicit_mask)
    torch.library.opcheck(OPS.masked_merge.default, (w, a.requires_grad_(), b.requires_grad_(), 0.5, mask))
    torch.library.opcheck(OPS.masked_merge.default, (w.clone().requires_grad_(), a, b, 0.5, mask))
    torch.library.opcheck(OPS.masked_merge_.default, (w.clone(), a.detach(), b.detach(), 0.5, mask))
    g = torch.randn_like(w)
    for output_mask in ([True, True], [True, False], [False, True]):
        torch.library.opcheck(OPS.masked_merge_backward.default, (g, w, a.detach(), b.detach(), 0.5, mask, output_mask))


@pytest.mark.parametrize("weight_dtype,out_dtype", [(torch.float32, torch.bfloat16), (torch.float32, torch.float16),
                                                    (torch.bfloat16, torch.float16), (torch.float16, torch.float32),
                                                    (torch.float32, torch.float64)], ids=str)
@pytest.mark.parametrize("factor_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("explicit_mask", [False, True])
def test_out_dtype(device, weight_dtype, out_dtype, factor_dtype, explicit_mask):
    """out_dtype writes the merged weight straight in another dtype: one rounding of the float result, whatever
    dtypes the weight and the factors are stored in (each is read in its own)."""
    w, a, b, mask = lora_operands(70, 264, 8, device=device, explicit_mask=explicit_mask)
    w, a, b = w.to(weight_dtype), a.to(factor_dtype), b.to(torch.float32)
    merged = sa.masked_merge(w, a, b, 0.75, mask, out_dtype=out_dtype)
    assert merged.dtype == out_dtype and merged.shape == w.shape
    ref64 = reference.masked_merge(w.double(), a.double(), b.double(), 0.75, None if mask is None else mask)
    eps = torch.finfo(out_dtype).eps if out_dtype != torch.float64 else torch.finfo(torch.float32).eps
    torch.testing.assert_close(merged.double().cpu(), ref64.cpu(), rtol=eps, atol=1e-6 * absmax(ref64))
    keep = (w != 0) if mask is None else mask
    assert torch.equal(merged[~keep], w[~keep].to(out_dtype))  # masked out: the weight, converted


def test_out_dtype_gradients_keep_the_operands_dtypes(device):
    w, a, b, _ = lora_operands(20, 16, 4, device=device)
    a, b = a.requires_grad_(), b.bfloat16().requires_grad_()
    merged = sa.masked_merge(w.requires_grad_(), a, b, 0.5, out_dtype=torch.bfloat16)
    merged.float().sum().backward()
    assert (w.grad.dtype, a.grad.dtype, b.grad.dtype) == (torch.float32, torch.float32, torch.bfloat16)
    ref_a, ref_b = (t.detach().double().requires_grad_() for t in (a, b))
    reference.masked_merge(w.detach().double(), ref_a, ref_b, 0.5).sum().backward()
    torch.testing.assert_close(a.grad.double(), ref_a.grad, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(b.grad.double(), ref_b.grad, rtol=1e-2, atol=1e-2)


def test_out_dtype_opcheck(device):
    w, a, b, mask = lora_operands(12, 24, 4, device=device, explicit_mask=True)
    torch.library.opcheck(OPS.masked_merge.default,
                          (w, a.requires_grad_(), b.bfloat16().requires_grad_(), 0.5, mask, torch.bfloat16))
