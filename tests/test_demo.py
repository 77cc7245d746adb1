"""The main job's pieces, and the quick demo end to end (what CI runs): prune SmolLM2-135M, recover it with
LoRS and the baselines, merge, and check the zero pattern."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from sparse_adapt import cli
from sparse_adapt.demo import run as demo_run
from sparse_adapt.lm import perplexity
from sparse_adapt.memory import SavedBytes

from toy_models import tiny_llama


def test_perplexity_is_exp_of_the_mean_token_loss():
    lm = tiny_llama().eval()
    ids = torch.randint(0, 96, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # padding in one row
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        logits = lm(input_ids=ids, attention_mask=mask).logits
    token_nll = F.cross_entropy(logits[:, :-1].reshape(-1, 96), labels[:, 1:].reshape(-1), ignore_index=-100,
                                reduction="none")
    expected = math.exp(token_nll.sum().item() / int((labels[:, 1:] != -100).sum()))
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    assert perplexity(lm, [batch]) == pytest.approx(expected, rel=1e-6)


def test_saved_bytes_counts_activations_not_parameters():
    w = torch.nn.Parameter(torch.randn(16, 8))
    model = torch.nn.Linear(8, 16)
    model.weight = w
    x = torch.randn(5, 8)
    with SavedBytes(model.parameters()) as saved:
        y = torch.relu(model(x))  # linear saves x (for grad of w), relu saves its output
    assert saved.total == x.numel() * 4 + y.numel() * 4


def test_zero_pattern_check():
    lm = tiny_llama()
    names = ["model.layers.0.mlp.up_proj"]
    layer = lm.get_submodule(names[0])
    with torch.no_grad():
        layer.weight[:, ::2] = 0
    masks = demo_run.pruned_masks(lm, names)
    assert demo_run.zero_pattern_check(lm, masks) == (True, 0.0)
    with torch.no_grad():
        layer.weight[0, 0] = 1.0
    exact, filled = demo_run.zero_pattern_check(lm, masks)
    assert not exact and filled == pytest.approx(1 / (layer.weight.numel() / 2))


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path):
    assert cli.main(["demo", "--quick", "--compare", "--out", str(tmp_path), "--no-progress"]) == 0
    assert (tmp_path / "report.md").exists() and (tmp_path / "perplexity.png").stat().st_size > 10_000
    result = json.loads((tmp_path / "results.json").read_text())
    by_method = {m["method"]: m for m in result["methods"]}
    assert list(by_method) == ["lors", "lora", "sqft", "spp"]
    assert result["pruned_ppl"] > result["dense_ppl"]
    for m in by_method.values():
        assert m["merged_ppl"] == pytest.approx(m["adapted_ppl"], rel=1e-3)  # merging changes nothing
    for name in ("lors", "sqft", "spp"):
        assert by_method[name]["keeps_zeros"], f"{name} lost the 2:4 zeros"
    assert not by_method["lora"]["keeps_zeros"] and by_method["lora"]["filled_fraction"] > 0.5
    assert by_method["lors"]["adapted_ppl"] < 0.8 * result["pruned_ppl"]  # LoRS recovers a real part of the loss
    lora_bytes = by_method["lora"]["saved_bytes"]
    assert by_method["lors"]["saved_bytes"] <= 1.01 * lora_bytes
    assert by_method["sqft"]["saved_bytes"] > 1.5 * lora_bytes
    # the merged LoRS model, written for serving as a compressed-tensors 2:4 checkpoint, reads back 2:4
    saved = result["saved_model"]
    assert saved["method"] == "lors" and saved["bytes"] < 0.8 * saved["dense_bytes"]
    from sparse_adapt import serving

    served = serving.load_sparse24(tmp_path / "merged-2of4", dtype=torch.bfloat16)
    linears = [m for n, m in served.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    assert len(linears) == 210 and all(serving.violations_2_4(m.weight) == 0 for m in linears)
    assert "merged-2of4" in (tmp_path / "report.md").read_text()
