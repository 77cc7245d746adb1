"""masked_lora_linear against the reference: values, LoRS and exact gradients, what it saves, gradcheck, opcheck."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import sparse_adapt as sa
from sparse_adapt import reference

from helpers import ALL_DTYPES, assert_grads_match_reference, lora_operands, nm_mask

OPS = torch.ops.sparse_adapt
X_SHAPES = [(), (5,), (2, 3)]  # leading dims of x: 1-D, 2-D, 3-D


def linear_operands(out, in_, r, lead=(5,), dtype=torch.float32, device="cpu", bias=True, seed=0, **kw):
    w, a, b, mask = lora_operands(out, in_, r, dtype=dtype, device=device, seed=seed, **kw)
    g = torch.Generator().manual_seed(seed + 100)
    x = torch.randn(*lead, in_, generator=g).to(device, dtype)
    bias_t = torch.randn(out, generator=g).to(device, dtype) if bias else None
    return [x, w, bias_t, a, b, 0.8, mask]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("lead", X_SHAPES, ids=str)
@pytest.mark.parametrize("exact_grad", [False, True])
@pytest.mark.parametrize("explicit_mask", [False, True])
def test_values_and_gradients(device, dtype, lead, exact_grad, explicit_mask):
    args = linear_operands(24, 40, 8, lead=lead, dtype=dtype, device=device, explicit_mask=explicit_mask)

    def ours(*a):
        return sa.masked_lora_linear(*a, exact_grad=exact_grad)

    def ref(*a):
        return reference.masked_lora_linear(*a, exact_grad=exact_grad)

    # x, weight, bias, lora_A, lora_B; then the adapter-only case that fine-tuning uses
    assert_grads_match_reference(ours, ref, args, [0, 1, 2, 3, 4])
    assert_grads_match_reference(ours, ref, args, [3, 4])


@pytest.mark.parametrize("out,in_,r", [(1, 1, 1), (3, 17, 2), (64, 48, 64), (100, 33, 5)])
def test_odd_shapes_and_ranks(device, out, in_, r):
    args = linear_operands(out, in_, r, lead=(7,), device=device)
    assert_grads_match_reference(sa.masked_lora_linear, reference.masked_lora_linear, args, [0, 3, 4])


def test_nm_mask(device):
    args = linear_operands(32, 64, 8, device=device, sparsity=0.0)
    g = torch.Generator().manual_seed(3)
    args[6] = nm_mask(32, 64, 2, 4, g).to(device)
    for exact in (False, True):
        assert_grads_match_reference(lambda *a, e=exact: sa.masked_lora_linear(*a, exact_grad=e),
                                     lambda *a, e=exact: reference.masked_lora_linear(*a, exact_grad=e), args,
                                     [0, 3, 4])


def test_lors_gradient_is_lora_gradient(device):
    """exact_grad=False gives the adapters exactly plain LoRA's gradients (the straight-through estimate)."""
    x, w, bias, a, b, s, _ = linear_operands(20, 30, 4, device=device)
    a.requires_grad_(), b.requires_grad_()
    y = sa.masked_lora_linear(x, w, bias, a, b, s)
    lora = torch.nn.functional.linear(x, w, bias) + s * (x @ a.t()) @ b.t()
    gy = torch.randn_like(y)
    for ours, theirs in zip(torch.autograd.grad(y, (a, b), gy), torch.autograd.grad(lora, (a, b), gy)):
        torch.testing.assert_close(ours, theirs)


def test_non_contiguous_inputs(device):
    x, w, bias, a, b, s, _ = linear_operands(24, 16, 4, lead=(6,), device=device)
    xt = x.t().contiguous().t()
    wt = w.t().contiguous().t()
    assert not (xt.is_contiguous() or wt.is_contiguous())
    args = [xt, wt, bias, a, b, s, None]
    assert_grads_match_reference(sa.masked_lora_linear, reference.masked_lora_linear, args, [0, 1, 3, 4])


def test_empty_batch(device):
    x, w, bias, a, b, s, _ = linear_operands(8, 12, 2, lead=(0,), device=device)
    a.requires_grad_(), b.requires_grad_()
    y = sa.masked_lora_linear(x, w, bias, a, b, s)
    assert y.shape == (0, 8)
    ga, gb = torch.autograd.grad(y.sum(), (a, b))
    assert torch.count_nonzero(ga) == 0 and torch.count_nonzero(gb) == 0


def test_saves_nothing_of_weight_size_but_weight():
    """Exactly what masked_lora_linear keeps for backward, counted with saved_tensors_hooks."""
    out, in_, r, tokens = 96, 80, 8, 32
    x, w, bias, a, b, s, mask = linear_operands(out, in_, r, lead=(tokens,), explicit_mask=True)
    a.requires_grad_(), b.requires_grad_(), x.requires_grad_()
    for m in (None, mask):
        saved = []

        def pack(t, saved=saved):
            saved.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = sa.masked_lora_linear(x, w, bias, a, b, s, m)
        weight_or_mask = (w.data_ptr(), (m if m is not None else w).data_ptr())
        big = [t for t in saved if t.numel() >= out * in_ and t.data_ptr() not in weight_or_mask]
        assert not big, f"saved an (out, in)-sized tensor besides weight/mask: {[tuple(t.shape) for t in big]}"
        ptrs = {t.data_ptr() for t in saved}
        allowed = {x.data_ptr(), w.data_ptr(), a.data_ptr(), b.data_ptr()}
        allowed |= {m.data_ptr()} if m is not None else set()
        assert ptrs <= allowed, "saved something that is not one of its inputs"
        saved_bytes = sum(t.numel() * t.element_size() for t in saved if t.data_ptr() != w.data_ptr()
                          and (m is None or t.data_ptr() != m.data_ptr()))
        assert saved_bytes == (x.numel() + a.numel() + b.numel()) * 4
        y.sum().backward()


def test_saves_no_activation_when_only_x_needs_grad():
    x, w, bias, a, b, s, _ = linear_operands(16, 12, 2, lead=(4,))
    x.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = sa.masked_lora_linear(x, w, bias, a, b, s)
    assert all(t.data_ptr() != x.data_ptr() for t in saved)
    (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    torch.testing.assert_close(gx, torch.ones_like(y) @ reference.masked_merge(w, a, b, s))


def test_gradcheck_exact_float64():
    x, w, bias, a, b, s, mask = linear_operands(6, 7, 2, lead=(3,), dtype=torch.float64, explicit_mask=True)
    for m in (None, mask):
        inputs = [t.requires_grad_() for t in (x, w, bias, a, b)] + [s, m, True]
        assert torch.autograd.gradcheck(sa.masked_lora_linear, inputs)


def test_gradcheck_lors_with_all_ones_mask_float64():
    """With M = 1 the straight-through estimate is the exact gradient, so gradcheck applies to exact_grad=False."""
    x, w, bias, a, b, s, _ = linear_operands(6, 7, 2, lead=(2, 3), dtype=torch.float64)
    ones = torch.ones_like(w, dtype=torch.bool)
    inputs = [t.requires_grad_() for t in (x, w, bias, a, b)] + [s, ones, False]
    assert torch.autograd.gradcheck(sa.masked_lora_linear, inputs)


@given(out=st.integers(1, 40), in_=st.integers(1, 40), r=st.integers(1, 16),
       lead=st.lists(st.integers(0, 4), min_size=0, max_size=2), bias=st.booleans(), exact=st.booleans(),
       seed=st.integers(0, 2**16))
def test_hypothesis_shapes(out, in_, r, lead, bias, exact, seed):
    args = linear_operands(out, in_, r, lead=tuple(lead), dtype=torch.float64, bias=bias, seed=seed)
    wrt = [0, 1, 3, 4] + ([2] if bias else [])
    assert_grads_match_reference(lambda *a: sa.masked_lora_linear(*a, exact_grad=exact),
                                 lambda *a: reference.masked_lora_linear(*a, exact_grad=exact), args, wrt)


@pytest.mark.parametrize("exact_grad", [False, True])
def test_opcheck(device, exact_grad):
    x, w, bias, a, b, s, mask = linear_operands(12, 16, 4, lead=(2, 3), device=device, explicit_mask=True)
    for m in (None, mask):
        torch.library.opcheck(OPS.masked_lora_linear.default,
                              (x.requires_grad_(), w, bias, a.requires_grad_(), b.requires_grad_(), s, m, exact_grad))
    gy = torch.randn(2, 3, 12, device=device)
    for output_mask in ([True] * 5, [True, False, False, True, True], [False, False, True, False, True]):
        torch.library.opcheck(OPS.masked_lora_linear_backward.default,
                              (gy, x.detach(), w, a.detach(), b.detach(), s, mask, exact_grad, output_mask))
