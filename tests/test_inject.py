"""inject's module selection, freezing and counting; config validation; LoRS's gradient-SVD init."""

import pytest
import torch
from torch import nn

import sparse_adapt as sa

from toy_models import ToyAttentionBlock, make_model, tiny_llama


def adapted_names(model):
    return sorted(n for n, _ in sa.adapter_layers(model))


def test_target_modules_by_name_regex_and_all_linear():
    lm = tiny_llama()
    sa.inject(lm, sa.SparseLoraConfig(target_modules=["q_proj", "v_proj"], r=2))
    expected = sorted(f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj"))
    assert adapted_names(lm) == expected

    lm = tiny_llama()
    sa.inject(lm, sa.SparseLoraConfig(target_modules=r"model\.layers\.1\.mlp\..*_proj", r=2))
    assert adapted_names(lm) == [f"model.layers.1.mlp.{p}" for p in ("down_proj", "gate_proj", "up_proj")]

    lm = tiny_llama()
    sa.inject(lm, sa.SparseLoraConfig(target_modules="all-linear", r=2))
    names = adapted_names(lm)
    assert len(names) == 2 * 7 and "lm_head" not in names  # every projection, not the output embedding


def test_everything_but_the_adapters_is_frozen():
    lm = tiny_llama()
    sa.inject(lm, sa.SparseLoraConfig(target_modules=["q_proj"], r=2))
    trainable = [n for n, p in lm.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("lora_A", "lora_B")) and "q_proj" in n for n in trainable)


def test_no_match_and_double_injection_are_errors():
    model = ToyAttentionBlock()
    with pytest.raises(ValueError, match="matches no nn.Linear"):
        sa.inject(model, sa.SparseLoraConfig(target_modules=["gate"]))
    sa.inject(model, sa.SparseLoraConfig(target_modules=["q_proj"], r=2))
    with pytest.raises(ValueError, match="already has sparse_adapt adapters"):
        sa.inject(model, sa.SparseLoraConfig(target_modules=["k_proj"], r=2))


def test_trainable_parameters_counts_effective_nonzeros():
    model = ToyAttentionBlock(d=32, hidden=64)
    total_before = sum(p.numel() for p in model.parameters())
    sa.inject(model, sa.RoseLoraConfig(target_modules=["q_proj", "up_proj"], r=4))
    counts = sa.trainable_parameters(model)
    adapter = 4 * 32 + 32 * 4 + 4 * 32 + 64 * 4
    assert counts.trainable == adapter and counts.total == total_before + adapter and counts.adapted_layers == 2
    assert counts.effective == 4 * 32 + 4 * 32  # B is still zero
    with torch.no_grad():
        for _, layer in sa.adapter_layers(model):
            layer.lora_B.fill_(1.0)
            layer.lora_A[:, 16:] = 0
    assert sa.trainable_parameters(model).effective == 4 * 16 * 2 + 32 * 4 + 64 * 4
    assert "trainable params" in str(counts)


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="dora"), "method must be one of"),
    (dict(r=0), "r must be a positive integer"),
    (dict(alpha=-1.0), "alpha must be"),
    (dict(dropout=1.0), "dropout must be in"),
    (dict(init="orthogonal"), "init must be one of"),
    (dict(target_modules=[]), "target_modules must be"),
    (dict(method="roselora"), "needs a RoseLoraConfig"),
    (dict(method="spp", init="gradient_svd"), "spp/spp_gc take init='zeros_B'"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sa.SparseLoraConfig(**kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(sparsity=1.0), "sparsity must be in"),
    (dict(beta=1.5), "beta must be in"),
    (dict(t_init=10, t_final=5), "t_init <= t_final"),
    (dict(clip=("spectral", 1.0)), "clip must be"),
    (dict(clip=("frobenius", -1.0)), "clip must be"),
])
def test_roselora_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sa.RoseLoraConfig(**kwargs)


def test_spp_needs_out_divisible_by_r():
    model = nn.Sequential(nn.Linear(8, 6))
    with pytest.raises(ValueError, match="not divisible by r=4"):
        sa.inject(model, sa.SparseLoraConfig(method="spp", r=4, target_modules=["0"]))


def test_gradient_svd_needs_calibration():
    with pytest.raises(ValueError, match="needs calibration_batches"):
        sa.inject(ToyAttentionBlock(), sa.SparseLoraConfig(init="gradient_svd"))


def weight_gradients(model, loss):
    """The true first-step gradient of every nn.Linear weight, from plain autograd."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for m in linears.values():
        m.weight.requires_grad_(True)
    grads = torch.autograd.grad(loss, [m.weight for m in linears.values()])
    for m in linears.values():
        m.weight.requires_grad_(False)
    return dict(zip(linears, grads))


@pytest.mark.parametrize("method,row_norm", [("lors", None), ("lora", None), ("lors", 1.0)])
def test_gradient_svd_init_is_the_top_singular_subspace_of_the_gradient(method, row_norm, device):
    model, example = make_model("attention")
    model.to(device)
    x = example().to(device)
    target = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(3)).to(device)

    def loss_fn(m, batch):
        return (m(batch) - target).square().mean()

    reference = weight_gradients(model, loss_fn(model, x))
    r = 4
    extra = {} if row_norm is None else dict(init_row_norm=row_norm)
    config = sa.SparseLoraConfig(method=method, r=r, init="gradient_svd", **extra)
    sa.inject(model, config, calibration_batches=[x], loss_fn=loss_fn)
    norm = 3 ** -0.5 if row_norm is None else row_norm  # default: the row norm of LoRA's kaiming-uniform A
    assert config.init_row_norm == norm
    for name, layer in sa.adapter_layers(model):
        assert torch.count_nonzero(layer.lora_B) == 0 and layer.lora_A.grad is None and layer.lora_B.grad is None
        V = torch.linalg.svd(reference[name]).Vh[:r]  # the exact top-r right singular vectors
        A = layer.lora_A.detach() / norm
        # orthogonal rows of that norm
        torch.testing.assert_close(A @ A.T, torch.eye(r, device=device), atol=1e-4, rtol=0)
        cosines = torch.linalg.svdvals(A @ V.T)  # of the principal angles between the two subspaces
        assert cosines.min() > 0.99, f"{name}: subspace cosines {cosines.tolist()}"
    with torch.no_grad():
        torch.testing.assert_close(model(x), make_model("attention")[0].to(device)(x))  # unchanged at step 0


def test_gradient_svd_first_step_is_the_best_rank_r_step():
    """With A from the gradient's SVD and B = 0, the first step changes B @ A along the gradient's best
    rank-r approximation: gB·A / s = dW Aᵀ A = U_r Σ_r V_rᵀ."""
    model, example = make_model("mlp")
    x = example()
    target = torch.randn(6, 8, generator=torch.Generator().manual_seed(2))

    def loss_fn(m, batch):
        return (m(batch) - target).square().mean()

    dW = weight_gradients(model, loss_fn(model, x))["fc1"]
    r = 4
    sa.inject(model, sa.SparseLoraConfig(method="lora", r=r, init="gradient_svd", target_modules=["fc1"]),
              calibration_batches=[x], loss_fn=loss_fn)
    loss_fn(model, x).backward()
    layer = model.fc1
    step_direction = layer.lora_B.grad @ layer.lora_A.detach() / layer.scale / layer.config.init_row_norm ** 2
    U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
    best_rank_r = U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]
    torch.testing.assert_close(step_direction, best_rank_r, atol=1e-3 * S[0].item(), rtol=0)


def test_init_row_norm_validation():
    for bad in (0.0, -1.0, float("nan"), "1"):
        with pytest.raises(ValueError, match="init_row_norm"):
            sa.SparseLoraConfig(init_row_norm=bad)


def test_rslora_scale():
    assert sa.SparseLoraConfig(r=16, alpha=32).scale == 2.0
    assert sa.SparseLoraConfig(r=16, alpha=32, use_rslora=True).scale == 8.0
    model = ToyAttentionBlock()
    sa.inject(model, sa.SparseLoraConfig(r=4, alpha=8, use_rslora=True, target_modules=["q_proj"]))
    assert model.q_proj.scale == 4.0
