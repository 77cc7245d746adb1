"""The ops inside torch.compile(fullgraph=True): forward and backward traced without graph breaks, same numbers."""

import pytest
import torch

import sparse_adapt as sa

from helpers import lora_operands


class MaskedLoraMLP(torch.nn.Module):
    """Two adapted layers, one through masked_lora_linear (LoRS), one through masked_merge (SQFT-style)."""

    def __init__(self, device, exact_grad):
        super().__init__()
        w1, a1, b1, _ = lora_operands(32, 24, 4, device=device, seed=1)
        w2, a2, b2, mask2 = lora_operands(16, 32, 4, device=device, seed=2, explicit_mask=True)
        self.register_buffer("w1", w1)
        self.register_buffer("w2", w2)
        self.register_buffer("mask2", mask2)
        self.a1, self.b1 = torch.nn.Parameter(a1), torch.nn.Parameter(b1)
        self.a2, self.b2 = torch.nn.Parameter(a2), torch.nn.Parameter(b2)
        self.exact_grad = exact_grad

    def forward(self, x):
        h = sa.masked_lora_linear(x, self.w1, None, self.a1, self.b1, 2.0, exact_grad=self.exact_grad)
        merged = sa.masked_merge(self.w2, self.a2, self.b2, 0.5, self.mask2)
        return torch.nn.functional.linear(torch.relu(h), merged)


@pytest.mark.slow
@pytest.mark.parametrize("exact_grad", [False, True])
def test_compiled_forward_backward_match_eager(device, exact_grad):
    torch.manual_seed(0)
    model = MaskedLoraMLP(device, exact_grad)
    x = torch.randn(3, 5, 24, device=device, requires_grad=True)
    compiled = torch.compile(model, fullgraph=True, backend="inductor")

    def run(m):
        y = m(x)
        grads = torch.autograd.grad(y.square().sum(), [x, *m.parameters()])
        return y, grads

    y_eager, g_eager = run(model)
    y_comp, g_comp = run(compiled)
    torch.testing.assert_close(y_comp, y_eager)
    for a, b in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b)


def test_no_graph_breaks(device):
    model = MaskedLoraMLP(device, exact_grad=False)
    x = torch.randn(4, 24, device=device)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
