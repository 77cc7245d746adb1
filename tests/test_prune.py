"""Magnitude and Wanda pruning: exact N:M structure, exact per-row fractions, Wanda's activation weighting."""

import pytest
import torch
from torch import nn

from sparse_adapt import prune

from toy_models import ToyMLP, tiny_llama


def test_nm_structure_is_exact():
    score = torch.rand(32, 64)
    keep = prune.keep_mask(score, "2:4")
    assert keep.view(32, 16, 4).sum(-1).eq(2).all()
    # the kept two are the two largest of each group
    groups = score.view(32, 16, 4)
    kept_min = groups.masked_fill(~keep.view(32, 16, 4), float("inf")).min(-1).values
    dropped_max = groups.masked_fill(keep.view(32, 16, 4), -float("inf")).max(-1).values
    assert (kept_min >= dropped_max).all()
    assert prune.keep_mask(torch.rand(4, 16), "1:8").view(4, 2, 8).sum(-1).eq(1).all()


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_per_row_fraction_is_exact(sparsity):
    keep = prune.keep_mask(torch.rand(10, 40), sparsity)
    assert keep.sum(1).eq(40 - round(sparsity * 40)).all()


def test_magnitude_keeps_the_largest_per_row():
    model = nn.Sequential(nn.Linear(8, 3))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1, -8, 3, 2, -7, 6, 5, 4]] * 3, dtype=torch.float32))
    report = prune.magnitude_(model, 0.5, progress=False)
    assert (model[0].weight[0] != 0).tolist() == [False, True, False, False, True, True, True, False]
    assert report.sparsity == {"0": 0.5}


def test_wanda_weights_by_activation_norm():
    model = nn.Sequential(nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        model[0].weight.fill_(1.0)  # equal magnitudes: only the inputs can decide
        model[0].weight[1, 0] = 0.05
    x = torch.tensor([[10.0, 1.0, 1.0, 10.0], [10.0, 1.0, 2.0, 10.0]])
    prune.wanda_(model, [x], 0.5, progress=False)
    assert (model[0].weight != 0).tolist() == [[True, False, False, True], [False, False, True, True]]


def test_wanda_on_a_transformer_reports_the_achieved_sparsity(device):
    lm = tiny_llama().to(device)
    batches = [{"input_ids": torch.randint(0, 96, (2, 8)).to(device)} for _ in range(2)]
    report = prune.wanda_(lm, batches, "2:4", progress=False)
    assert len(report.sparsity) == 14 and "lm_head" not in report.sparsity
    assert all(s == pytest.approx(0.5) for s in report.sparsity.values())
    for name in report.sparsity:
        w = lm.get_submodule(name).weight
        assert (w != 0).view(w.shape[0], -1, 4).sum(-1).eq(2).all()
    assert "achieved sparsity" in report.summary() and "| layer |" in report.to_markdown()


@pytest.mark.parametrize("bad", ["2:2", "0:4", "4:2", "half", 1.0, -0.1])
def test_bad_sparsity(bad):
    with pytest.raises(ValueError, match="sparsity must be"):
        prune.magnitude_(ToyMLP(), bad, progress=False)


def test_nm_needs_divisible_inputs():
    with pytest.raises(ValueError, match="divisible by 4"):
        prune.magnitude_(nn.Sequential(nn.Linear(6, 4)), "2:4", progress=False)


def test_wanda_needs_calibration_that_reaches_the_layers():
    with pytest.raises(ValueError, match="calibration_batches is empty"):
        prune.wanda_(ToyMLP(), [], 0.5, progress=False)
