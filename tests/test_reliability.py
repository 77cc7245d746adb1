"""Every mutating call succeeds correctly or refuses and changes nothing.

The guarantee is stated in general -- a fault injected at a random layer of inject / load_adapter / prune /
merge / pruner.step leaves the model's state_dict, module types, requires_grad and gradients exactly as before --
and each defect that motivated it is kept as a regression test."""

import json
import random

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import sparse_adapt as sa
from sparse_adapt.adapters import io as adapter_io
from sparse_adapt.adapters import model as adapter_model

from toy_models import make_model, tiny_llama

# ------------------------------------------------------------------------------------------------ the guarantee


def snapshot(model: nn.Module):
    """Everything a failed call must leave as it was."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "types": {n: type(m) for n, m in model.named_modules()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
    }


def assert_unchanged(model: nn.Module, before) -> None:
    after = snapshot(model)
    assert after["types"] == before["types"], "modules were replaced"
    assert after["requires_grad"] == before["requires_grad"], "requires_grad changed"
    assert after["state"].keys() == before["state"].keys(), "state_dict keys changed"
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), f"{k} changed"
    for k, g in before["grads"].items():
        assert (g is None) == (after["grads"][k] is None) and (g is None or torch.equal(g, after["grads"][k])), k


class FailOnCall:
    """Wraps a callable so that its n-th call raises (n counted from 0)."""

    def __init__(self, fn, n):
        self.fn, self.n, self.calls = fn, n, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls - 1 == self.n:
            raise RuntimeError("injected fault")
        return self.fn(*args, **kwargs)


def linear_count(model):
    return len(sa.adapters.find_targets(model, "all-linear"))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("method", ["lors", "roselora", "spp"])
def test_inject_with_a_fault_at_a_random_layer_changes_nothing(method, seed, monkeypatch):
    model, _ = make_model("llama")
    before = snapshot(model)
    n = random.Random(seed).randrange(linear_count(model))
    monkeypatch.setattr(adapter_model, "SparseLoraLinear", FailOnCall(adapter_model.SparseLoraLinear, n))
    with pytest.raises(RuntimeError, match="injected fault"):
        sa.inject(model, sa.config_for(method, r=4))
    assert_unchanged(model, before)
    monkeypatch.undo()
    sa.inject(model, sa.config_for(method, r=4))  # and a retry works


def calibration(model_input):
    return [{"ids": model_input()}]


def test_failed_gradient_svd_init_changes_nothing():
    model, example = make_model("llama")
    config = sa.config_for("lors", r=4, init="gradient_svd")
    before = snapshot(model)
    cases = [
        ([example()], None, TypeError, "need a loss_fn"),  # not dicts
        ([], lambda m, b: m(b).sum(), ValueError, "empty"),
        ([example()], lambda m, b: m(b).sum() * float("nan"), ValueError, "loss is nan"),
        # a loss that never uses the second decoder layer's projections
        ([example()], lambda m, b: m.lm.model.embed_tokens(b).sum() + m.lm.model.layers[0].mlp.up_proj.lora_A.sum(),
         RuntimeError, "no gradient reached"),
    ]
    for batches, loss_fn, error, match in cases:
        with pytest.raises(error, match=match):
            sa.inject(model, config, calibration_batches=batches, loss_fn=loss_fn)
        assert_unchanged(model, before)
    sa.inject(model, config, calibration_batches=[example()], loss_fn=lambda m, b: m(b).square().mean())


def test_spp_layer_that_cannot_take_the_rank_changes_nothing():
    model, _ = make_model("mlp")  # head has out_features 8: r=16 does not divide it, the earlier layers' do
    before = snapshot(model)
    with pytest.raises(ValueError, match="head.*not divisible by r=16"):
        sa.inject(model, sa.config_for("spp", r=16))
    assert_unchanged(model, before)
    sa.inject(model, sa.config_for("spp", r=8))


# ---------------------------------------------------------------------------------------------------- loading


@pytest.fixture
def saved_lors(tmp_path):
    model, example = make_model("llama")
    sa.inject(model, sa.config_for("lors", r=4))
    with torch.no_grad():
        for _, layer in sa.adapter_layers(model):
            layer.lora_B.normal_()
    sa.save_adapter(model, tmp_path)
    return model, example, tmp_path


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("into", ["fresh", "adapted"])
def test_load_with_a_fault_at_a_random_tensor_changes_nothing(saved_lors, into, seed, monkeypatch):
    _, _, directory = saved_lors
    model, _ = make_model("llama")
    if into == "adapted":
        sa.inject(model, sa.config_for("lors", r=4))
    before = snapshot(model)
    n = random.Random(seed).randrange(2 * linear_count(model))
    monkeypatch.setattr(adapter_io, "assign_", FailOnCall(adapter_io.assign_, n))
    with pytest.raises(RuntimeError, match="injected fault"):
        sa.load_adapter(model, directory)
    assert_unchanged(model, before)


def test_huge_rank_in_a_small_file_is_refused_before_allocating(saved_lors):
    _, _, d = saved_lors
    for name in (adapter_io.CONFIG_NAME,):
        meta = json.loads((d / name).read_text())
        meta["config"]["r"] = 8_000_000
        (d / name).write_text(json.dumps(meta))
    tensors = load_file(d / adapter_io.WEIGHTS_NAME)
    save_file(tensors, d / adapter_io.WEIGHTS_NAME, metadata={"format": "pt", adapter_io.METADATA_KEY: json.dumps(
        json.loads((d / adapter_io.CONFIG_NAME).read_text()), sort_keys=True)})
    fresh, _ = make_model("llama")
    before = snapshot(fresh)
    allocated = []
    real_empty = torch.empty

    def watching_empty(*size, **kw):  # any real (out x 8M) allocation would pass through here
        t = real_empty(*size, **kw)
        if t.device.type != "meta":
            allocated.append(t.numel())
        return t

    torch.empty = watching_empty
    try:
        with pytest.raises(ValueError, match="made for another model"):
            sa.load_adapter(fresh, d)
    finally:
        torch.empty = real_empty
    assert max(allocated, default=0) < 1_000_000
    assert_unchanged(fresh, before)


def test_load_into_merged_adapters_is_refused(saved_lors):
    model, example, d = saved_lors
    other, _ = make_model("llama")
    sa.inject(other, sa.config_for("lors", r=4))
    sa.merge(other, unload=False)
    before = snapshot(other)
    with pytest.raises(ValueError, match="merged"):
        sa.load_adapter(other, d)
    assert_unchanged(other, before)
    sa.unmerge(other)
    sa.load_adapter(other, d)
    x = example()
    with torch.no_grad():
        torch.testing.assert_close(other(x), model(x))


@pytest.mark.parametrize("field, value", [("alpha", 3.0), ("use_rslora", True), ("exact_grad", True)])
def test_load_into_adapters_of_another_scale_is_refused(saved_lors, field, value):
    _, _, d = saved_lors
    other, _ = make_model("llama")
    sa.inject(other, sa.config_for("lors", r=4, **{field: value}))
    before = snapshot(other)
    with pytest.raises(ValueError, match=f"configs differ.*{field}"):
        sa.load_adapter(other, d)
    assert_unchanged(other, before)


def test_files_from_two_saves_are_detected(saved_lors, monkeypatch):
    model, example, d = saved_lors
    with torch.no_grad():
        for _, layer in sa.adapter_layers(model):
            layer.lora_B.mul_(2)

    def crash(*args, **kwargs):
        raise OSError("killed between the two files")

    monkeypatch.setattr(adapter_io, "_write_json", crash)
    with pytest.raises(OSError):
        sa.save_adapter(model, d)  # new weights are in place, the config is the old one
    monkeypatch.undo()
    fresh, _ = make_model("llama")
    before = snapshot(fresh)
    with pytest.raises(ValueError, match="not from the same save"):
        sa.load_adapter(fresh, d)
    assert_unchanged(fresh, before)
    # The weights file carries its own config: without the stale JSON it loads as saved.
    (d / adapter_io.CONFIG_NAME).unlink()
    assert_loads_as(d, model, example)


def assert_loads_as(directory, model, example):
    """The adapter in `directory`, loaded into a fresh model, computes what `model` does."""
    fresh, _ = make_model("llama")
    sa.load_adapter(fresh, directory)
    x = example()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))


def test_an_edited_config_is_detected(saved_lors):
    _, _, d = saved_lors
    meta = json.loads((d / adapter_io.CONFIG_NAME).read_text())
    meta["config"]["alpha"] = 64.0
    (d / adapter_io.CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="edited after the save"):
        sa.load_adapter(make_model("llama")[0], d)


def test_format_1_directories_still_load(saved_lors):
    model, example, d = saved_lors
    meta = json.loads((d / adapter_io.CONFIG_NAME).read_text())
    meta["format_version"] = 1
    del meta["save_id"]
    (d / adapter_io.CONFIG_NAME).write_text(json.dumps(meta))
    save_file(load_file(d / adapter_io.WEIGHTS_NAME), d / adapter_io.WEIGHTS_NAME, metadata={"format": "pt"})
    assert_loads_as(d, model, example)


def test_the_weights_file_carries_the_config(saved_lors):
    _, _, d = saved_lors
    with safe_open(d / adapter_io.WEIGHTS_NAME, framework="pt") as f:
        embedded = json.loads(f.metadata()[adapter_io.METADATA_KEY])
    assert embedded == json.loads((d / adapter_io.CONFIG_NAME).read_text())
    assert embedded["format_version"] == 2 and len(embedded["save_id"]) == 32


# ---------------------------------------------------------------------------------------------------- pruning


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("pruner", ["magnitude", "wanda"])
def test_prune_with_a_fault_at_a_random_layer_changes_nothing(pruner, seed, monkeypatch):
    lm = tiny_llama()
    before = snapshot(lm)
    n = random.Random(seed).randrange(linear_count(lm))
    monkeypatch.setattr(sa.prune, "keep_mask", FailOnCall(sa.prune.keep_mask, n))
    ids = torch.randint(0, 96, (2, 8))
    with pytest.raises(RuntimeError, match="injected fault"):
        if pruner == "magnitude":
            sa.prune.magnitude_(lm, "2:4", progress=False)
        else:
            sa.prune.wanda_(lm, [{"input_ids": ids}], "2:4", progress=False)
    assert_unchanged(lm, before)


def test_nm_pruning_checks_every_layer_first():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 6), nn.Linear(6, 4))  # the last one: 6 % 4 != 0
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"divisible by 4.*2 \(in_features=6\)"):
        sa.prune.magnitude_(model, "2:4", progress=False)
    assert_unchanged(model, before)


def roselora_step_model(fault):
    """A RoseLoRA model after one optimizer step, with `fault` at a random layer: its gradient missing, or its
    score buffer of the wrong dtype."""
    model, example = make_model("attention")
    sa.inject(model, sa.RoseLoraConfig(r=4, sparsity=0.5, t_final=4))
    layers = [layer for _, layer in sa.adapter_layers(model)]
    victim = layers[random.Random(fault).randrange(1, len(layers))]
    if fault == "score":
        victim.rose_score_B = victim.rose_score_B.double()
    pruner = sa.RoseLoraPruner(model, total_steps=4)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(example()).square().mean().backward()
    opt.step()
    if fault == "grad":
        victim.lora_B.grad = None
    return model, pruner


@pytest.mark.parametrize("fault", ["grad", "score"])
def test_pruner_step_with_a_fault_at_a_random_layer_changes_nothing(fault):
    model, pruner = roselora_step_model(fault)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="no gradient|must be float32"):
        pruner.step()
    assert_unchanged(model, before)
    assert pruner.step_count == 0


def test_pruner_refuses_a_schedule_that_never_prunes():
    model, _ = make_model("mlp")
    sa.inject(model, sa.RoseLoraConfig(r=4, t_init=10))
    with pytest.raises(ValueError, match="never prune"):
        sa.RoseLoraPruner(model, total_steps=5)
    model2, _ = make_model("mlp")
    sa.inject(model2, sa.RoseLoraConfig(r=4, t_init=2, t_final=30))
    with pytest.warns(UserWarning, match="t_final=30 > total_steps=10"):
        sa.RoseLoraPruner(model2, total_steps=10)


# ---------------------------------------------------------------------------------------------------- merging


def spp_model_with_a_dead_factor(layer_index):
    model, example = make_model("mlp")
    sa.inject(model, sa.config_for("spp", r=4))
    layers = [layer for _, layer in sa.adapter_layers(model)]
    with torch.no_grad():
        for layer in layers:
            layer.lora_B.normal_(std=0.1)
        bad = layers[layer_index]
        # 1 + s·A[0, j]·b[0] == 0 for a kept weight of row 0: the merge would zero it
        j = int((bad.base_layer.weight[0] != 0).nonzero()[0])
        bad.lora_B[0] = 1.0
        bad.lora_A[0, j] = -1.0 / bad.scale
    return model, example


@pytest.mark.parametrize("layer_index", [0, 2])
def test_spp_merge_that_would_zero_a_weight_is_refused_for_every_layer(layer_index):
    model, _ = spp_model_with_a_dead_factor(layer_index)
    before = snapshot(model)
    with pytest.raises(ValueError, match="exactly 0"):
        sa.merge(model)
    assert_unchanged(model, before)
    assert not any(layer.merged for _, layer in sa.adapter_layers(model))


def test_spp_unmerge_where_the_factor_is_zero_on_a_pruned_weight_is_finite():
    model, example = make_model("mlp")
    sa.inject(model, sa.config_for("spp", r=4))
    layer = next(sa.adapter_layers(model))[1]
    w0 = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        j = int((w0[0] == 0).nonzero()[0])  # a pruned weight: its factor may be 0
        layer.lora_B[0] = 1.0
        layer.lora_A[0, j] = -1.0 / layer.scale
    sa.merge(model, unload=False)
    sa.unmerge(model)
    w1 = layer.base_layer.weight
    assert torch.isfinite(w1).all() and torch.equal(w1 != 0, w0 != 0)
    torch.testing.assert_close(w1, w0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_a_merge_that_cancels_a_weight_keeps_it_non_zero(dtype):
    weight = torch.tensor([[0.5, 0.0, -0.25, 1.0]], dtype=dtype)
    lora_A = torch.tensor([[1.0, 1.0, 1.0, 1.0]], dtype=dtype)
    lora_B = torch.tensor([[-0.5]], dtype=dtype)
    pattern = weight != 0
    merged = sa.masked_merge(weight, lora_A, lora_B, 1.0)
    assert torch.equal(merged != 0, pattern)
    assert merged[0, 0] == torch.finfo(dtype).tiny  # the smallest normal number, the sum's (w's) sign
    w = weight.clone()
    sa.masked_merge_(w, lora_A, lora_B, 1.0)
    assert torch.equal(w != 0, pattern)
    sa.masked_merge_(w, lora_A, lora_B, -1.0)  # unmerge: pattern and values back
    assert torch.equal(w != 0, pattern)
    torch.testing.assert_close(w, weight)


def test_a_merge_that_underflows_in_half_precision_keeps_the_weight_non_zero():
    weight = torch.tensor([[1e-9, -1e-9, 0.0, 0.5]])  # fp32 weights below float16's smallest subnormal
    lora_A, lora_B = torch.zeros(1, 4), torch.zeros(1, 1)
    merged = sa.masked_merge(weight, lora_A, lora_B, 1.0, out_dtype=torch.float16)
    tiny = torch.finfo(torch.float16).tiny
    assert merged.tolist() == [[tiny, -tiny, 0.0, 0.5]]


def test_merge_unmerge_keeps_the_pattern_of_a_bf16_model():
    model, example = make_model("attention")
    model.to(torch.bfloat16)
    sa.inject(model, sa.config_for("lors", r=4))
    layers = [layer for _, layer in sa.adapter_layers(model)]
    patterns = [layer.base_layer.weight != 0 for layer in layers]
    with torch.no_grad():
        for layer in layers:  # B @ A cancels every kept weight of row 0 exactly
            w = layer.base_layer.weight
            layer.lora_A.zero_()
            layer.lora_B.zero_()
            layer.lora_A[0] = -w[0] / layer.scale
            layer.lora_B[0, 0] = 1.0
    sa.merge(model, unload=False)
    for layer, pattern in zip(layers, patterns):
        assert torch.equal(layer.base_layer.weight != 0, pattern)
    sa.unmerge(model)
    for layer, pattern in zip(layers, patterns):
        assert torch.equal(layer.base_layer.weight != 0, pattern)


def tied_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))


def test_merging_a_tied_lm_head_leaves_the_embeddings_alone():
    lm = tied_llama().eval()
    assert lm.lm_head.weight is lm.model.embed_tokens.weight
    embeddings = lm.model.embed_tokens.weight.detach().clone()
    sa.inject(lm, sa.config_for("lora", r=4, target_modules=["lm_head", "q_proj"]))
    with torch.no_grad():
        for _, layer in sa.adapter_layers(lm):
            layer.lora_B.normal_()
    ids = torch.randint(0, 96, (2, 6))
    with torch.no_grad():
        adapted = lm(input_ids=ids).logits
        sa.merge(lm)
        merged = lm(input_ids=ids).logits
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)
    assert torch.equal(lm.model.embed_tokens.weight, embeddings)
    assert lm.lm_head.weight is not lm.model.embed_tokens.weight and not lm.config.tie_word_embeddings


class WithMHA(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        return self.fc(self.attn(x, x, x, need_weights=False)[0])


def test_multihead_attention_out_proj_is_not_adapted():
    model = WithMHA()
    sa.inject(model, sa.config_for("lora", r=4))
    assert [n for n, _ in sa.adapter_layers(model)] == ["fc"]
    model(torch.randn(2, 3, 16)).sum().backward()
    other = WithMHA()
    before = snapshot(other)
    with pytest.raises(ValueError, match="MultiheadAttention reads out_proj.weight"):
        sa.inject(other, sa.config_for("lora", r=4, target_modules=["out_proj"]))
    assert_unchanged(other, before)


class DigitTokens:
    """Digits as tokens, enough for apply_edits on the tiny Llama (vocabulary 96)."""

    pad_token_id = 0
    eos_token_id = 0

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [int(c) for c in text.split()]}

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(int(i)) for i in ids)


@pytest.mark.parametrize("method", ["roselora", "ft-l"])
def test_a_failed_edit_leaves_the_model_as_it_came(method, monkeypatch):
    lm = tiny_llama()
    before = snapshot(lm)
    owner = sa.RoseLoraPruner if method == "roselora" else torch.optim.Adam
    failing = FailOnCall(owner.step, 2)  # the third step of the edit fails
    monkeypatch.setattr(owner, "step", lambda self, *args, **kwargs: failing(self, *args, **kwargs))
    config = sa.edit.EditConfig(method=method, steps=4, ft_module="model.layers.1.mlp.down_proj",
                                generation_tokens=4, early_stop=False, preserve=0.0, neighbors=0, prefixes=0)
    with pytest.raises(RuntimeError, match="injected fault"):
        sa.edit.apply_edits(lm, DigitTokens(), [sa.edit.Edit("1 2 3", "4 5")], config)
    assert failing.calls == 3
    assert_unchanged(lm, before)
