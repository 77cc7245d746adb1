"""ema_topk_ against the reference: the EMA scores, the kept set (ties to the lower index), in place on
non-contiguous tensors, every dtype, long and short slices, opcheck, compile, and CPU == CUDA bit for bit."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import sparse_adapt as sa
from sparse_adapt import reference

OPS = torch.ops.sparse_adapt


def operands(shape, dtype=torch.float32, device="cpu", seed=0, score_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    param = torch.randn(shape, generator=g).to(device, dtype)
    grad = torch.randn(shape, generator=g).to(device, dtype)
    score = (torch.rand(shape, generator=g) * score_scale).to(device)
    return param, grad, score


def check_against_reference(param, grad, score, beta, k, dim):
    """Run the op; the score must match the reference's, and the kept set must be the reference's top-k of the
    score the op produced (so a last-bit difference in the EMA cannot flip a near-tie silently)."""
    p0, s0 = param.clone(), score.clone()
    sa.ema_topk_(param, grad, score, beta, k, dim)
    ref_param, ref_score = p0.cpu().clone(), s0.cpu().clone()
    reference.ema_topk_(ref_param, grad.cpu(), ref_score, beta, k, dim)
    torch.testing.assert_close(score.cpu(), ref_score, rtol=1e-6, atol=1e-7)
    keep = reference.topk_keep_mask(score.cpu(), k, dim)
    assert torch.equal(param.cpu(), torch.where(keep, p0.cpu(), torch.zeros_like(p0.cpu())))
    return keep


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,dim,k", [((16, 300), 1, 30), ((300, 16), 0, 7), ((8, 5), 1, 5), ((8, 5), 0, 0),
                                         ((1, 1), 1, 1), ((1, 1), 0, 0), ((3, 14336), 1, 1433), ((14336, 2), 0, 100),
                                         ((64, 1), 1, 1), ((1, 64), 0, 1), ((6, 7), -1, 3), ((6, 7), -2, 2)])
def test_matches_reference(device, dtype, shape, dim, k):
    param, grad, score = operands(shape, dtype, device)
    keep = check_against_reference(param, grad, score, 0.8, k, dim)
    assert (keep.sum(dim) == k).all()


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_beta_extremes(device, beta):
    param, grad, score = operands((12, 40), device=device)
    check_against_reference(param, grad, score, beta, 10, 1)


def test_ties_go_to_the_lower_index(device):
    param = torch.arange(1.0, 13.0, device=device).reshape(2, 6)  # all non-zero
    grad = torch.zeros_like(param)
    score = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.5, 2.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]], device=device)
    sa.ema_topk_(param, grad, score, 1.0, 3, 1)
    assert (param != 0).tolist() == [[False, True, True, True, False, False], [True, True, True, False, False, False]]


def test_nan_scores_rank_lowest(device):
    param = torch.ones(1, 5, device=device)
    score = torch.tensor([[float("nan"), 1.0, float("nan"), 0.0, 3.0]], device=device)
    sa.ema_topk_(param, torch.zeros_like(param), score, 1.0, 3, 1)
    assert (param != 0).tolist() == [[False, True, False, True, True]]


def test_already_pruned_entries_and_repeated_steps(device):
    """RoseLoRA calls the op every step with a falling k; pruned entries score |0·g| = 0 and fade out."""
    param, grad, score = operands((8, 64), device=device)
    score.zero_()
    for k in (64, 48, 32, 16, 8):
        grad = torch.randn_like(param)
        keep = check_against_reference(param, grad, score, 0.85, k, 1)
        assert ((param.cpu() != 0) == keep).all()


def test_non_contiguous_param_and_score(device):
    param, grad, score = operands((20, 12), device=device)
    p_store, s_store = param.t().contiguous(), score.t().contiguous()
    p_view, s_view = p_store.t(), s_store.t()  # (20, 12) views of column-major storage
    expected_p, expected_s = param.clone(), score.clone()
    reference.ema_topk_(expected_p, grad, expected_s, 0.7, 4, 0)
    sa.ema_topk_(p_view, grad.t().contiguous().t(), s_view, 0.7, 4, 0)
    torch.testing.assert_close(s_view, expected_s)
    keep = reference.topk_keep_mask(s_view, 4, 0)
    assert torch.equal(p_store.t(), torch.where(keep, param, torch.zeros_like(param)))


@given(rows=st.integers(1, 40), cols=st.integers(1, 40), dim=st.sampled_from([0, 1, -1, -2]),
       frac=st.floats(0, 1), beta=st.floats(0, 1), seed=st.integers(0, 2**16), ties=st.booleans())
def test_hypothesis(rows, cols, dim, frac, beta, seed, ties):
    param, grad, score = operands((rows, cols), seed=seed)
    if ties:  # coarse scores and gradients produce many exact ties
        score = torch.round(score * 4) / 4
        grad = torch.round(grad)
    k = round(frac * param.shape[dim])
    check_against_reference(param, grad, score, beta, k, dim)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape,dim,k", [((16, 4096), 1, 400), ((14336, 16), 0, 1500), ((5, 3), 0, 2)])
def test_cpu_and_cuda_pick_the_same_entries(dtype, shape, dim, k):
    param, grad, score = operands(shape, dtype, score_scale=0.0)
    score = torch.round(torch.rand(shape) * 8) / 8  # with ties
    cpu = [param.clone(), grad, score.clone()]
    gpu = [t.clone().cuda() for t in (param, grad, score)]
    sa.ema_topk_(*cpu, 0.85, k, dim)
    sa.ema_topk_(*gpu, 0.85, k, dim)
    assert torch.equal(cpu[2], gpu[2].cpu()), "EMA scores differ between CPU and CUDA"
    assert torch.equal(cpu[0], gpu[0].cpu()), "kept entries differ between CPU and CUDA"


def test_opcheck(device):
    for dtype in (torch.float32, torch.bfloat16):
        param, grad, score = operands((10, 24), dtype, device)
        for dim, k in ((1, 5), (0, 3)):
            torch.library.opcheck(OPS.ema_topk_.default, (param.clone(), grad, score.clone(), 0.8, k, dim))


@pytest.mark.slow
def test_compiles_without_graph_breaks(device):
    param, grad, score = operands((8, 32), device=device)

    def prune(p, g, s):
        sa.ema_topk_(p, g, s, 0.8, 5, 1)
        return p.sum()

    expected_p, expected_s = param.clone(), score.clone()
    prune(expected_p, grad, expected_s)
    torch.compile(prune, fullgraph=True)(param, grad, score)
    assert torch.equal(param, expected_p) and torch.equal(score, expected_s)


# ------------------------------------------------------------------------------------------ the multi-tensor form

def _matrices(specs, device="cpu", seed=0):
    """(params, grads, scores, ks, dims) for specs [(rows, cols, dim, k, dtype)]."""
    out = ([], [], [], [], [])
    for i, (rows, cols, dim, k, dtype) in enumerate(specs):
        p, g, s = operands((rows, cols), dtype, device, seed=seed + i)
        for lst, v in zip(out, (p, g, s, k, dim)):
            lst.append(v)
    return out


@given(specs=st.lists(st.tuples(st.integers(1, 30), st.integers(1, 30), st.sampled_from([0, 1, -1]),
                                st.floats(0, 1), st.sampled_from([torch.float32, torch.bfloat16, torch.float64])),
                      min_size=1, max_size=7),
       beta=st.floats(0, 1), seed=st.integers(0, 2**16))
def test_multi_equals_one_call_per_matrix(specs, beta, seed):
    specs = [(r, c, d, round(f * (c if d in (1, -1) else r)), dt) for r, c, d, f, dt in specs]
    params, grads, scores, ks, dims = _matrices(specs, seed=seed)
    expected = [(p.clone(), s.clone()) for p, s in zip(params, scores)]
    for (p, s), g, k, d in zip(expected, grads, ks, dims):
        sa.ema_topk_(p, g, s, beta, k, d)
    sa.ema_topk_multi_(params, grads, scores, beta, ks, dims)
    for (p, s), got_p, got_s in zip(expected, params, scores):
        assert torch.equal(got_p, p) and torch.equal(got_s, s)


def test_multi_on_non_contiguous_matrices(device):
    param, grad, score = operands((20, 12), device=device)
    p_view, s_view = param.t().contiguous().t(), score.t().contiguous().t()
    expected_p, expected_s = param.clone(), score.clone()
    sa.ema_topk_(expected_p, grad, expected_s, 0.7, 4, 0)
    other = operands((3, 9), device=device, seed=5)
    sa.ema_topk_multi_([p_view, other[0]], [grad, other[1]], [s_view, other[2]], 0.7, [4, 2], [0, 1])
    assert torch.equal(p_view, expected_p) and torch.equal(s_view, expected_s)


def test_multi_checks_every_matrix_before_changing_any(device):
    params, grads, scores, ks, dims = _matrices([(4, 10, 1, 3, torch.float32)] * 5, device)
    before = [t.clone() for t in params + scores]
    ks[3] = 11  # > n for the fourth matrix
    message = r"sparse_adapt.ema_topk_multi_: k must be in \[0, 10\] \(the length of params\[3\]"
    with pytest.raises(ValueError, match=message):
        sa.ema_topk_multi_(params, grads, scores, 0.8, ks, dims)
    assert all(torch.equal(a, b) for a, b in zip(params + scores, before))
    scores[2] = scores[2].double()
    with pytest.raises(RuntimeError, match=r"scores\[2\] must be float32"):
        sa.ema_topk_multi_(params, grads, scores, 0.8, [3] * 5, dims)
    with pytest.raises(ValueError, match="one entry per matrix"):
        sa.ema_topk_multi_(params, grads[:4], scores, 0.8, ks, dims)


def test_multi_refuses_matrices_that_share_memory(device):
    params, grads, scores, ks, dims = _matrices([(4, 10, 1, 3, torch.float32)] * 3, device)
    with pytest.raises(RuntimeError, match="share memory"):
        sa.ema_topk_multi_([params[0], params[0]], grads[:2], scores[:2], 0.8, ks[:2], dims[:2])
    big = torch.randn(8, 10, device=device)
    with pytest.raises(RuntimeError, match=r"params\[0\] and params\[1\] share memory"):
        sa.ema_topk_multi_([big[:5], big[4:]], [torch.randn(5, 10, device=device), torch.randn(4, 10, device=device)],
                           [torch.zeros(5, 10, device=device), torch.zeros(4, 10, device=device)], 0.8, [3, 3], [1, 1])
    # Reading one gradient twice is fine: only written tensors must be apart.
    sa.ema_topk_multi_(params[:2], [grads[0], grads[0]], scores[:2], 0.8, ks[:2], dims[:2])


def test_multi_opcheck(device):
    params, grads, scores, ks, dims = _matrices([(6, 20, 1, 5, torch.float32), (20, 6, 0, 2, torch.bfloat16)], device)
    torch.library.opcheck(OPS.ema_topk_multi_.default, (params, grads, scores, 0.8, ks, dims))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_multi_cpu_and_cuda_pick_the_same_entries(dtype):
    # RoseLoRA's shapes on Llama-3-8B at r = 16 (rows of A, columns of B), plus short and tied slices.
    specs = [(16, 4096, 1, 410, dtype), (4096, 16, 0, 410, dtype), (16, 14336, 1, 1434, dtype),
             (14336, 16, 0, 1434, dtype), (8, 300, 1, 30, dtype), (300, 8, 0, 0, dtype)] * 10
    cpu = _matrices(specs)
    for s in cpu[2]:
        s.copy_(torch.round(s * 8) / 8)  # ties
    gpu = [[t.cuda() for t in lst] for lst in cpu[:3]]
    sa.ema_topk_multi_(*cpu[:3], 0.85, cpu[3], cpu[4])
    sa.ema_topk_multi_(*gpu, 0.85, cpu[3], cpu[4])
    for a, b in zip(cpu[0] + cpu[2], gpu[0] + gpu[2]):
        assert torch.equal(a, b.cpu())


@given(rows=st.integers(1, 12), cols=st.integers(1, 300), dim=st.sampled_from([0, 1]), frac=st.floats(0, 1),
       levels=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_massive_ties(rows, cols, dim, frac, levels, seed):
    """beta = 1 keeps the scores as given: a few distinct values, so the k-th largest is shared by many entries
    and exactly the lowest indices among them must be kept."""
    g = torch.Generator().manual_seed(seed)
    param = torch.randn(rows, cols, generator=g)
    score = torch.randint(0, levels, (rows, cols), generator=g).float() / levels
    k = round(frac * param.shape[dim])
    check_against_reference(param, torch.randn(rows, cols, generator=g), score, 1.0, k, dim)
