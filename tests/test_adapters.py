"""The PEFT-style matrix: every method on every toy model through the same generic tests."""

import copy

import pytest
import torch
from torch import nn

import sparse_adapt as sa
from sparse_adapt.adapters import SPARSITY_PRESERVING

from toy_models import MODELS, make_model

METHODS = list(sa.METHODS)


def config_for(method, **kw):
    kw.setdefault("target_modules", "all-linear")
    return sa.config_for(method, r=4, alpha=8, **kw)


def on_device(model_name, device="cpu", seed=0):
    """make_model's model and example inputs, on `device`."""
    model, example = make_model(model_name, seed)
    return model.to(device), lambda: example().to(device)


def adapted(method, model_name, seed=0, device="cpu", **kw):
    model, example = on_device(model_name, device, seed)
    base = copy.deepcopy(model)
    sa.inject(model, config_for(method, **kw))
    return model, base, example


def train_steps(model, example, steps=3, lr=0.05):
    """A few SGD steps on a fixed random target, so that B (or SPP's b) becomes non-zero."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    x = example()
    target = torch.randn_like(model(x).float())
    for _ in range(steps):
        opt.zero_grad()
        loss = (model(x).float() - target).square().mean()
        loss.backward()
        opt.step()
    return x


def linear_weights(model):
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("method", METHODS)
def test_identity_at_init(method, model_name, device):
    model, base, example = adapted(method, model_name, device=device)
    x = example()
    torch.testing.assert_close(model(x), base(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("method", METHODS)
def test_only_adapter_parameters_change(method, model_name, device):
    model, _, example = adapted(method, model_name, device=device)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_steps(model, example)
    for n, p in model.named_parameters():
        if n in trainable:
            if n.endswith("lora_B"):
                assert not torch.equal(p, before[n]), f"{n} did not train"
        else:
            assert torch.equal(p, before[n]), f"frozen {n} changed"


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("method", METHODS)
def test_merge_equals_adapted_forward_and_keeps_zeros(method, model_name, device):
    model, base, example = adapted(method, model_name, device=device)
    x = train_steps(model, example)
    model.eval()
    with torch.no_grad():
        y_adapted = model(x)
    pruned = linear_weights(base)
    sa.merge(model)
    assert not list(sa.adapter_layers(model))
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n in pruned)
    with torch.no_grad():
        torch.testing.assert_close(model(x), y_adapted, rtol=1e-4, atol=1e-5)
    merged = linear_weights(model)
    adapted_names = [n for n in merged if not torch.equal(merged[n], pruned[n])]
    assert adapted_names, "merge changed no weight"
    for n in adapted_names:
        same_zeros = torch.equal(merged[n] == 0, pruned[n] == 0)
        if method in SPARSITY_PRESERVING:
            assert same_zeros, f"{method}: merged {n} lost the pruned zero pattern"
        else:
            # the dense baselines fill the pruned positions: what sparsity-preserving methods exist to prevent
            assert (merged[n][pruned[n] == 0] != 0).any(), f"{method}: expected {n}'s zeros to be filled"


@pytest.mark.parametrize("method", METHODS)
def test_unmerge_and_unload_restore_the_base(method, device):
    model, base, example = adapted(method, "attention", device=device)
    x = train_steps(model, example)
    with torch.no_grad():
        y = model(x)
        sa.merge(model, unload=False)
        assert all(layer.merged for _, layer in sa.adapter_layers(model))
        torch.testing.assert_close(model(x), y, rtol=1e-4, atol=1e-5)
        sa.unmerge(model)
        torch.testing.assert_close(model(x), y, rtol=1e-4, atol=1e-5)
    sa.unload(model)
    for n, w in linear_weights(model).items():
        torch.testing.assert_close(w, linear_weights(base)[n], rtol=1e-5, atol=1e-6)
        assert torch.equal(w == 0, linear_weights(base)[n] == 0)


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("method", METHODS)
def test_save_load_round_trip(method, model_name, tmp_path, device):
    model, _, example = adapted(method, model_name, device=device)
    x = train_steps(model, example)
    sa.save_adapter(model, tmp_path)
    fresh, _ = on_device(model_name, device)
    sa.load_adapter(fresh, tmp_path)
    model.eval(), fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    state = sa.adapters.io.adapter_state(fresh)
    for k, v in sa.adapters.io.adapter_state(model).items():
        assert torch.equal(state[k], v), k


@pytest.mark.parametrize("method", METHODS)
def test_bfloat16(method, device):
    model, base, example = adapted(method, "attention", device=device)
    train_steps(model, example)
    x = example()
    with torch.no_grad():
        y32 = model(x)
    model_bf16 = copy.deepcopy(model).to(torch.bfloat16)
    y16 = model_bf16(x.bfloat16())
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, rtol=5e-2, atol=5e-2)
    y16.float().square().mean().backward()
    grads = [p.grad for p in model_bf16.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == torch.bfloat16 and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("method", METHODS)
def test_compiled_model_has_no_graph_breaks(method, device):
    model, _, example = adapted(method, "attention", device=device)
    train_steps(model, example, steps=1)
    explanation = torch._dynamo.explain(model)(example())
    assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lors", "sqft_gc"])
def test_compiled_llama_forward_backward_matches_eager(method, device):
    model, _, example = adapted(method, "llama", device=device)
    train_steps(model, example, steps=1)
    x = example()
    params = [p for p in model.parameters() if p.requires_grad]

    def step(m):
        y = m(x)
        return y, torch.autograd.grad(y.float().square().mean(), params)

    y_eager, g_eager = step(model)
    y_comp, g_comp = step(torch.compile(model, fullgraph=True))
    torch.testing.assert_close(y_comp, y_eager, rtol=1e-4, atol=1e-5)
    for a, b in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_dropout_applies_to_the_adapter_branch_only_for_lora():
    model, base, example = adapted("lora", "mlp", dropout=0.5)
    model.train()
    x = example()
    torch.testing.assert_close(model(x), base(x), rtol=0, atol=1e-6)  # B = 0: dropout cannot show yet
    train_steps(model, example)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x))  # deterministic in eval
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))
