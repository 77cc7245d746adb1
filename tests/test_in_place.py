"""The in-place ops (masked_merge_, ema_topk_, ema_topk_multi_) behave as torch's own in-place ops towards
autograd: they bump the version counter, refuse a tensor that requires grad while grad mode is on, refuse
inference tensors outside inference mode, and refuse written tensors that overlap themselves or another operand --
each refusal before anything is written."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sparse_adapt as sa
from sparse_adapt import reference

from helpers import lora_operands


def merge_args():
    w, a, b, _ = lora_operands(8, 16, 4, seed=0)
    return w, a, b


def topk_args(rows=4, cols=8):
    g = torch.Generator().manual_seed(0)
    return torch.randn(rows, cols, generator=g), torch.randn(rows, cols, generator=g), torch.rand(rows, cols,
                                                                                                  generator=g)


def call(op, tensors):
    """Run `op` on (weight, A, B) or (param, grad, score)."""
    if op == "masked_merge_":
        sa.masked_merge_(*tensors, 0.5)
    elif op == "ema_topk_":
        sa.ema_topk_(*tensors, 0.5, 3, 1)
    else:
        p, g, s = tensors
        sa.ema_topk_multi_([p], [g], [s], 0.5, [3], [1])


def args_of(op):
    return list(merge_args() if op == "masked_merge_" else topk_args())


OPS = ["masked_merge_", "ema_topk_", "ema_topk_multi_"]
WRITTEN = {"masked_merge_": [0], "ema_topk_": [0, 2], "ema_topk_multi_": [0, 2]}


def assert_refused_untouched(op, tensors, error, match):
    before = [t.detach().clone() for t in tensors]
    with pytest.raises(error, match=match):
        call(op, tensors)
    for t, b in zip(tensors, before):
        assert torch.equal(t.detach(), b), "a refused call wrote"


@pytest.mark.parametrize("op", OPS)
def test_writes_bump_the_version_counter(op):
    tensors = args_of(op)
    versions = [t._version for t in tensors]
    call(op, tensors)
    for i, (t, v) in enumerate(zip(tensors, versions)):
        assert (t._version > v) == (i in WRITTEN[op])


@pytest.mark.parametrize("op", OPS)
def test_a_tensor_saved_for_backward_and_then_written_is_detected(op):
    tensors = args_of(op)
    written = tensors[WRITTEN[op][0]]
    x = torch.randn(3, written.shape[0], requires_grad=True)
    y = (x @ written).sum()  # saves `written` for backward
    with torch.no_grad():
        call(op, tensors)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("which", [0, 1, 2])
def test_an_operand_requiring_grad_is_refused_under_grad_mode(op, which):
    tensors = args_of(op)
    tensors[which] = tensors[which].requires_grad_()  # a leaf, as a parameter is
    assert_refused_untouched(op, tensors, RuntimeError, "requires grad.*torch.no_grad")
    with torch.no_grad():
        call(op, tensors)  # as torch's in-place ops: allowed under no_grad


def test_masked_merge_refuses_a_non_leaf_that_requires_grad():
    w, a, b = merge_args()
    a = a.requires_grad_() * 1.0  # would silently drop the gradient to the leaf
    with pytest.raises(RuntimeError, match="lora_A requires grad.*would drop its gradient"):
        sa.masked_merge_(w, a, b, 0.5)


@pytest.mark.parametrize("op", OPS)
def test_inference_tensors_are_written_only_in_inference_mode(op):
    with torch.inference_mode():
        tensors = args_of(op)
    assert_refused_untouched(op, tensors, RuntimeError, "inference tensor.*inference_mode")
    with torch.inference_mode():
        call(op, tensors)


@pytest.mark.parametrize("op", OPS)
def test_an_expanded_written_tensor_is_refused(op):
    tensors = args_of(op)
    i = WRITTEN[op][-1]
    tensors[i] = tensors[i][:, :1].expand_as(tensors[i])
    assert_refused_untouched(op, tensors, RuntimeError, "share memory")


def test_aliasing_views_are_refused():
    w = torch.randn(16, 16)
    a, b = torch.randn(4, 16), torch.randn(16, 4)
    before = w.clone()
    with pytest.raises(RuntimeError, match="weight and lora_A share memory"):
        sa.masked_merge_(w, w[:4], b, 0.5)
    with pytest.raises(RuntimeError, match="share memory"):
        sa.masked_merge_(w, a, w[:, :4], 0.5)
    assert torch.equal(w, before)
    param = torch.randn(4, 16)
    with pytest.raises(RuntimeError, match="share memory"):
        sa.ema_topk_(param[:, :8], torch.randn(4, 8), param[:, 8:], 0.5, 3, 1)  # interleaved rows of one storage
    p0, p1 = torch.randn(4, 8), torch.randn(4, 8)
    g = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match=r"params\[0\] and scores\[1\] share memory"):
        sa.ema_topk_multi_([p0, p1], [g, g], [torch.zeros(4, 8), p0], 0.5, [2, 2], [1, 1])
    sa.ema_topk_multi_([p0, p1], [g, g], [torch.zeros(4, 8), torch.zeros(4, 8)], 0.5, [2, 2], [1, 1])  # grads may


@pytest.mark.parametrize("bad", [2.0, 2.7, True, "2"])
def test_k_and_dim_must_be_integers(bad):
    p, g, s = topk_args()
    with pytest.raises(TypeError, match="k must be an integer"):
        sa.ema_topk_(p, g, s, 0.5, bad, 1)
    with pytest.raises(TypeError, match="dim must be an integer"):
        sa.ema_topk_(p, g, s, 0.5, 2, bad if bad is not True else 1.0)
    with pytest.raises(TypeError, match=r"ks\[0\] must be an integer"):
        sa.ema_topk_multi_([p], [g], [s], 0.5, [bad], [1])
    sa.ema_topk_(p, g, s, 0.5, torch.tensor(2), 1)  # an integer tensor is an index


FMAX = torch.finfo(torch.float32).max
SPECIAL = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1.0, -1.0, FMAX, -FMAX, 1e-45]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(SPECIAL), min_size=2, max_size=24), st.data())
def test_reference_ranks_infinities_and_nan_as_the_kernels_do(values, data):
    score = torch.tensor(values).reshape(1, -1)
    k = data.draw(st.integers(0, score.shape[1]))
    param = torch.randn(score.shape) + 3.0  # no zeros: the kept set is the non-zero set
    # beta = 1 keeps the scores as they are; a zero gradient keeps |p·g| finite
    sa.ema_topk_(param, torch.zeros_like(param), score.clone(), 1.0, k, 1)
    expected = reference.topk_keep_mask(score, k, 1)
    assert torch.equal(param != 0, expected), (values, k)
