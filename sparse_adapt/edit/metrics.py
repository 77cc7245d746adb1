"""Knowledge-editing metrics, as in the RoseLoRA paper and EasyEdit / ROME.

- token accuracy: with the prompt and the previous target tokens given (teacher forcing), the fraction of target
  tokens that are the model's greedy (argmax) prediction; an answer is *exact* when all of them are.
- edit success / generalization / portability: token accuracy of the new target after the prompt / after its
  rephrasings / of the expected answer of related prompts.
- locality: token agreement of an unrelated prompt's continuation after the edit with the one before it.
- fluency: ROME's weighted bi-/tri-gram entropy of generated text (weights 2/3 and 4/3, log base 2).
"""

import math
from collections import Counter
from typing import List, Sequence

import torch
from torch import Tensor


def encode(tokenizer, text: str, special: bool) -> List[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int):
    """Right-padded (input_ids, attention_mask): for a causal LM, padding after the tokens changes nothing."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    return ids, mask


@torch.no_grad()
def token_matches(model, tokenizer, prompts: Sequence[str], targets: Sequence[Sequence[int]],
                  batch_size: int = 16) -> List[List[bool]]:
    """For each (prompt, target token ids): is each target token the argmax given everything before it?"""
    device = next(model.parameters()).device
    out: List[List[bool]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = range(start, min(start + batch_size, len(prompts)))
        prompt_ids = [encode(tokenizer, prompts[i], True) for i in chunk]
        seqs = [p + list(targets[i]) for p, i in zip(prompt_ids, chunk)]
        ids, mask = pad_batch(seqs, tokenizer.pad_token_id or 0)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        predicted = logits.argmax(-1).cpu()
        for row, (p, i) in enumerate(zip(prompt_ids, chunk)):
            target = list(targets[i])
            positions = range(len(p) - 1, len(p) - 1 + len(target))
            out.append([int(predicted[row, pos]) == tok for pos, tok in zip(positions, target)])
    return out


def accuracy(matches: Sequence[Sequence[bool]]) -> float:
    """Mean token accuracy over answers (each answer weighted equally); NaN when there are none."""
    if not matches:
        return math.nan
    return sum(sum(m) / len(m) for m in matches) / len(matches)


def exact(matches: Sequence[Sequence[bool]]) -> float:
    return math.nan if not matches else sum(all(m) for m in matches) / len(matches)


@torch.no_grad()
def greedy_continuations(model, tokenizer, prompts: Sequence[str], tokens: int) -> List[List[int]]:
    """The next `tokens` greedy tokens after each prompt (one prompt at a time: no padding subtleties)."""
    return continue_ids(model, tokenizer, [encode(tokenizer, prompt, True) for prompt in prompts], tokens)


@torch.no_grad()
def continue_ids(model, tokenizer, sequences: Sequence[Sequence[int]], tokens: int) -> List[List[int]]:
    """The next `tokens` greedy tokens after each sequence of token ids, one at a time."""
    device = next(model.parameters()).device
    out = []
    for seq in sequences:
        ids = torch.tensor([list(seq)], device=device)
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        out.append(generated[0, ids.shape[1]:].tolist())
    return out


def ngram_entropy(text: str, n: int) -> float:
    """Entropy (bits) of the frequency distribution of the word n-grams of text."""
    words = text.split()
    grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    total = sum(grams.values())
    if not total:
        return 0.0
    return -sum(c / total * math.log2(c / total) for c in grams.values())


def fluency(texts: Sequence[str]) -> float:
    """ROME's generation entropy: per text the mean of (2/3)·H₂ and (4/3)·H₃, averaged over texts."""
    if not texts:
        return math.nan
    weights = {2: 2 / 3, 3: 4 / 3}
    scores = [sum(w * ngram_entropy(t, n) for n, w in weights.items()) / len(weights) for t in texts]
    return sum(scores) / len(scores)


def nonzero_count(t: Tensor) -> int:
    return int(torch.count_nonzero(t))
