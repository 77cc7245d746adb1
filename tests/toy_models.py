"""Small models for the adapter test matrix: each is pruned so that the sparsity-preserving methods have zeros
to preserve. (name -> factory(seed) returning (model, example_input_fn))."""

import torch
from torch import nn

from helpers import nm_mask


def prune_(model: nn.Module, pattern: str, seed: int = 0) -> nn.Module:
    """Zero half of every Linear weight: 'unstructured' (random 50%) or '2:4'."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                out, in_ = m.weight.shape
                keep = nm_mask(out, in_, 2, 4, g) if pattern == "2:4" else torch.rand(out, in_, generator=g) >= 0.5
                m.weight.mul_(keep.to(m.weight.device))
    return model


class ToyMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(24, 64)
        self.fc2 = nn.Linear(64, 32)
        self.head = nn.Linear(32, 8, bias=False)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class ToyAttentionBlock(nn.Module):
    """Llama-like projections without bias, batch-first (B, T, D) input."""

    def __init__(self, d=32, hidden=64):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.up_proj = nn.Linear(d, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        att = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        h = x + self.o_proj(att @ v)
        return h + self.down_proj(torch.nn.functional.silu(self.up_proj(h)))


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config)


class LlamaLogits(nn.Module):
    """Wraps a causal LM so that the test matrix can call model(x) -> tensor."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, ids):
        return self.lm(input_ids=ids, use_cache=False).logits


def make_model(name: str, seed: int = 0):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    if name == "mlp":
        return prune_(ToyMLP(), "unstructured", seed), lambda: torch.randn(6, 24, generator=g)
    if name == "attention":
        return prune_(ToyAttentionBlock(), "2:4", seed), lambda: torch.randn(2, 5, 32, generator=g)
    if name == "llama":
        return LlamaLogits(prune_(tiny_llama(), "2:4", seed)), lambda: torch.randint(0, 96, (2, 7), generator=g)
    raise KeyError(name)


MODELS = ["mlp", "attention", "llama"]
