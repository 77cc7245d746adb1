"""Causal-LM helpers shared by the demo, the editor and the benchmarks: batches of tokenized text, perplexity."""

import math
from typing import Dict, List, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import distributed


def lm_batches(tokenizer, texts: Sequence[str], batch_size: int, length: int) -> List[Dict[str, torch.Tensor]]:
    """Causal-LM batches of texts truncated/padded to `length`; padding is masked out of the loss (labels -100).
    A last partial batch is dropped."""
    out = []
    for i in range(0, len(texts) - batch_size + 1, batch_size):
        enc = tokenizer(list(texts[i:i + batch_size]), return_tensors="pt", truncation=True, max_length=length,
                        padding="max_length")
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels})
    return out


def to_device(batch: Dict[str, torch.Tensor], device) -> Dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def perplexity(model: nn.Module, batches, device="cpu") -> float:
    """exp(mean next-token negative log-likelihood) over the non-padding tokens of the batches. In a process group
    each rank takes every world-th batch and the sums are added up, so every rank returns the same number."""
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    for batch in list(batches)[distributed.rank()::distributed.world_size()]:
        batch = to_device(batch, device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        labels = batch["labels"][:, 1:]
        nll += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                               ignore_index=-100, reduction="sum").item()
        count += int((labels != -100).sum())
    model.train(was_training)
    totals = torch.tensor([nll, count], dtype=torch.float64, device=device)
    if distributed.world_size() > 1:
        dist.all_reduce(totals)
    return math.exp(totals[0].item() / totals[1].item())
