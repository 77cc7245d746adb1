"""Counterfactual edits built from `countryinfo` (change a country's capital), only on facts the model knows."""

import random
from typing import List, Sequence, Tuple

from . import metrics
from .editing import Edit

PROMPT = "The capital of {} is"
REPHRASINGS = ("{}'s capital is", "The capital city of {} is")


def capital_facts() -> List[Tuple[str, str]]:
    """(country, capital) for every country with one capital (a one-element list counts as one)."""
    from countryinfo import CountryInfo

    facts = []
    for info in CountryInfo.all().values():
        capital = info.get("capital")
        if isinstance(capital, list):
            capital = capital[0] if len(capital) == 1 else None
        if info.get("name") and isinstance(capital, str) and capital.strip():
            facts.append((info["name"], capital.strip()))
    return sorted(set(facts))


def known_facts(model, tokenizer, facts: Sequence[Tuple[str, str]]) -> List[Tuple[str, str]]:
    """The facts whose capital's first token is the model's greedy next token after the prompt."""
    prompts = [PROMPT.format(c) for c, _ in facts]
    firsts = [metrics.encode(tokenizer, " " + cap, False)[:1] for _, cap in facts]
    matches = metrics.token_matches(model, tokenizer, prompts, firsts)
    return [f for f, m in zip(facts, matches) if all(m)]


def counterfactual_edits(known: Sequence[Tuple[str, str]], n: int, seed: int = 0,
                         locality: int = 20) -> Tuple[List[Edit], List[str]]:
    """n edits, each moving a known country's capital to another known country's capital, with rephrasings and a
    portability prompt (the reverse relation: "<new capital> is the capital of" -> the country); and up to
    `locality` prompts about other known capitals, which should keep their answers."""
    if len(known) < n + 2:
        raise ValueError(f"need at least {n + 2} known facts, have {len(known)}")
    rng = random.Random(seed)
    chosen = rng.sample(list(known), len(known))
    edited, rest = chosen[:n], chosen[n:]
    edits = []
    for country, capital in edited:
        new = rng.choice([c for _, c in known if c != capital])
        edits.append(Edit(PROMPT.format(country), new, [r.format(country) for r in REPHRASINGS],
                          [(f"{new} is the capital of", country)]))
    return edits, [PROMPT.format(c) for c, _ in rest[:locality]]
