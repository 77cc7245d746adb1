"""Mixed precision: the ops under torch.autocast follow PyTorch's conventions for a linear layer -- compute and
output in the autocast dtype, each gradient in its parameter's dtype -- and every adapter method trains under
transformers.Trainer(bf16=True)."""

import pytest
import torch

import sparse_adapt as sa
from sparse_adapt import reference

from helpers import absmax, lora_operands, lowprec_slack

AUTOCAST_DTYPES = [torch.bfloat16, torch.float16]


def _run(fn, inputs, grad_out, autocast_dtype, device):
    """Output and gradients of fn on fresh leaves (x, weight, bias, lora_A, lora_B; weight frozen)."""
    x, w, bias, a, b = (t.detach().clone().requires_grad_(i != 1) for i, t in enumerate(inputs))
    with torch.autocast(device, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        y = fn(x, w, bias, a, b)
    grads = torch.autograd.grad(y, [x, bias, a, b], grad_out.to(y.dtype))
    return y, grads


def _case(device, seed=0):
    w, a, b, _ = lora_operands(40, 56, 8, device=device, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(3, 5, 56, generator=g).to(device)
    bias = torch.randn(40, generator=g).to(device)
    grad_out = torch.randn(3, 5, 40, generator=g).to(device)
    return (x, w, bias, a, b), grad_out


@pytest.mark.parametrize("autocast_dtype", AUTOCAST_DTYPES, ids=str)
@pytest.mark.parametrize("exact_grad", [False, True])
def test_masked_lora_linear_under_autocast(device, autocast_dtype, exact_grad):
    inputs, grad_out = _case(device)

    def ours(x, w, bias, a, b):
        return sa.masked_lora_linear(x, w, bias, a, b, 0.5, exact_grad=exact_grad)

    def ref(x, w, bias, a, b):
        return reference.masked_lora_linear(x, w, bias, a, b, 0.5, exact_grad=exact_grad)

    y, grads = _run(ours, inputs, grad_out, autocast_dtype, device)
    # PyTorch's conventions for a linear layer: output in the autocast dtype, fp32 leaves get fp32 gradients.
    assert y.dtype == autocast_dtype
    assert all(g.dtype == torch.float32 for g in grads)
    # Accuracy: the flash-attention rule against float64, with the pure-PyTorch reference under the same autocast
    # as the yardstick (it casts lora_A/lora_B to the low dtype before multiplying; ours accumulates them in fp32).
    y64, grads64 = _run(ref, [t.double() for t in inputs], grad_out.double(), None, device)
    y_low, grads_low = _run(ref, inputs, grad_out, autocast_dtype, device)
    for name, got, want, yardstick in zip(["y", "grad x", "grad bias", "grad A", "grad B"], [y, *grads],
                                          [y64, *grads64], [y_low, *grads_low]):
        err = absmax(got.double() - want)
        base = absmax(yardstick.double() - want)
        assert err <= 2 * base + lowprec_slack(autocast_dtype, want), f"{name}: error {err} vs PyTorch's {base}"


def test_autocast_leaves_float64_alone(device):
    inputs, grad_out = _case(device)
    x, w, bias, a, b = (t.double() for t in inputs)
    with torch.autocast(device, dtype=torch.bfloat16):
        y = sa.masked_lora_linear(x, w, bias, a, b, 0.5)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, reference.masked_lora_linear(x, w, bias, a, b, 0.5))


def test_half_precision_base_with_fp32_adapters(device):
    """PEFT's usual layout: a bf16 base weight, fp32 adapters (autocast_adapter_dtype); under autocast the merge
    reads each in its own dtype."""
    (x, w, bias, a, b), grad_out = _case(device)
    w16 = w.bfloat16()
    y, grads = _run(lambda x, w, bias, a, b: sa.masked_lora_linear(x, w, bias, a, b, 0.5),
                    (x, w16, bias, a, b), grad_out, torch.bfloat16, device)
    assert y.dtype == torch.bfloat16 and grads[2].dtype == torch.float32
    y64 = reference.masked_lora_linear(x.bfloat16().double(), w16.double(), bias.double(), a.double(), b.double(), 0.5)
    assert absmax(y.double() - y64) <= 3e-2 * absmax(y64)


def test_mixed_dtypes_outside_autocast_are_refused(device):
    (x, w, bias, a, b), _ = _case(device)
    with pytest.raises(RuntimeError, match="lora_A has dtype"):
        sa.masked_lora_linear(x, w.bfloat16(), None, a, b.bfloat16(), 0.5)
    with pytest.raises(RuntimeError, match="x has dtype"):
        sa.masked_lora_linear(x.bfloat16(), w, None, a, b, 0.5)
    # ... but an explicit compute dtype asks for exactly what autocast does.
    y = sa.masked_lora_linear(x.bfloat16(), w, bias, a, b, 0.5, compute_dtype=torch.bfloat16)
    with torch.autocast(device, dtype=torch.bfloat16):
        assert torch.equal(y, sa.masked_lora_linear(x, w, bias, a, b, 0.5))


def test_merge_and_pruning_ops_work_under_autocast(device):
    w, a, b, _ = lora_operands(16, 24, 4, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        merged = sa.masked_merge(w, a, b, 0.5)  # not a matmul: runs in its inputs' dtype, like elementwise ops
        param, grad, score = a.clone(), torch.randn_like(a), torch.zeros_like(a)
        sa.ema_topk_(param, grad, score, 0.8, 5, 1)
    assert merged.dtype == torch.float32
    torch.testing.assert_close(merged, reference.masked_merge(w, a, b, 0.5))
    assert (param != 0).sum(1).eq(5).all()


class _LorsMLP(torch.nn.Module):
    def __init__(self, device):
        super().__init__()
        w1, a1, b1, _ = lora_operands(32, 24, 4, device=device, seed=1)
        w2, a2, b2, _ = lora_operands(16, 32, 4, device=device, seed=2)
        self.register_buffer("w1", w1)
        self.register_buffer("w2", w2)
        self.a1, self.b1, self.a2, self.b2 = (torch.nn.Parameter(t) for t in (a1, b1, a2, b2))

    def forward(self, x):
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            h = torch.relu(sa.masked_lora_linear(x, self.w1, None, self.a1, self.b1, 2.0))
            return sa.masked_lora_linear(h, self.w2, None, self.a2, self.b2, 0.5)


@pytest.mark.slow
def test_compiled_under_autocast_matches_eager(device):
    model = _LorsMLP(device)
    x = torch.randn(3, 5, 24, device=device, requires_grad=True)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(model, fullgraph=True)

    def run(m):
        y = m(x)
        return y, torch.autograd.grad(y.float().square().sum(), [x, *m.parameters()])

    (y_eager, g_eager), (y_comp, g_comp) = run(model), run(compiled)
    assert y_comp.dtype == torch.bfloat16 and all(g.dtype == torch.float32 for g in g_comp)
    torch.testing.assert_close(y_comp, y_eager, rtol=2e-2, atol=2e-2)
    for got, want in zip(g_comp, g_eager):
        torch.testing.assert_close(got, want, rtol=5e-2, atol=5e-2 * absmax(want))


@pytest.mark.slow
@pytest.mark.parametrize("method", sa.METHODS)
def test_trainer_bf16_every_method(tmp_path, method, device):
    """transformers.Trainer(bf16=True) trains under torch.autocast(bfloat16), on the CPU and on a GPU: a few steps
    of every method on a tiny Llama compute in bf16, keep fp32 adapters, move them; the merged model keeps the zeros
    where it should."""
    transformers = pytest.importorskip("transformers")
    from toy_models import prune_, tiny_llama

    torch.manual_seed(0)
    lm = prune_(tiny_llama(), "2:4")
    config = sa.config_for(method, r=4, alpha=8, target_modules="all-linear")
    sa.inject(lm, config)
    zeros = {n: (layer.base_layer.weight == 0).clone() for n, layer in sa.adapter_layers(lm)}
    ids = torch.randint(0, 96, (16, 12), generator=torch.Generator().manual_seed(0))
    dataset = [{"input_ids": row, "labels": row} for row in ids]
    callbacks = [sa.RoseLoraPruner(lm).trainer_callback()] if isinstance(config, sa.RoseLoraConfig) else []
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=8,
                                          learning_rate=2e-2, report_to=[], save_strategy="no", use_cpu=device == "cpu",
                                          bf16=True, logging_steps=1, disable_tqdm=True)
    trainer = transformers.Trainer(model=lm, args=args, train_dataset=dataset, callbacks=callbacks)
    assert next(lm.parameters()).device.type == device  # the Trainer put the model on the device
    seen = []
    hook = next(sa.adapter_layers(lm))[1].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    trainer.train()
    hook.remove()
    assert seen and all(d == torch.bfloat16 for d in seen), f"{method} did not compute in bf16 under Trainer: {seen}"
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))
    for _, layer in sa.adapter_layers(lm):
        assert layer.lora_A.dtype == torch.float32 and layer.lora_B.abs().sum() > 0
    sa.merge(lm)
    if config.preserves_sparsity:
        for name, was_zero in zeros.items():
            assert torch.equal(lm.get_submodule(name).weight.cpu() == 0, was_zero), name  # the Trainer moved it
