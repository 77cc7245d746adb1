"""Counterfactual edits built from `countryinfo` -- a country's capital, continent, language or demonym changed --
on facts the model knows. Used to *evaluate* editing (the held-out neighbours of each edit come from here); the
editing itself never consults this table."""

import random
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from . import metrics
from .editing import Edit


def _capital(info) -> Optional[str]:
    capital = info.get("capital")
    if isinstance(capital, list):
        capital = capital[0] if len(capital) == 1 else None
    return capital.strip() if isinstance(capital, str) and capital.strip() else None


def _continent(info) -> Optional[str]:
    region = info.get("region")
    return region if region in ("Africa", "Asia", "Europe", "Oceania") else None  # "Americas" is not a continent


def _demonym(info) -> Optional[str]:
    demonym = info.get("demonym")
    return demonym.strip() if isinstance(demonym, str) and demonym.strip() else None


# countryinfo gives languages as ISO 639-1 codes; the names of those a country can have as its one language.
_LANGUAGES = {
    "am": "Amharic", "ar": "Arabic", "az": "Azerbaijani", "bg": "Bulgarian", "bn": "Bengali", "cs": "Czech",
    "da": "Danish", "de": "German", "dz": "Dzongkha", "el": "Greek", "en": "English", "es": "Spanish",
    "et": "Estonian", "fa": "Persian", "fi": "Finnish", "fr": "French", "he": "Hebrew", "hi": "Hindi",
    "hr": "Croatian", "hu": "Hungarian", "hy": "Armenian", "id": "Indonesian", "is": "Icelandic", "it": "Italian",
    "ja": "Japanese", "ka": "Georgian", "kk": "Kazakh", "km": "Khmer", "ko": "Korean", "lo": "Lao",
    "lt": "Lithuanian", "lv": "Latvian", "mg": "Malagasy", "mn": "Mongolian", "ms": "Malay", "my": "Burmese",
    "ne": "Nepali", "nl": "Dutch", "no": "Norwegian", "pl": "Polish", "ps": "Pashto", "pt": "Portuguese",
    "ro": "Romanian", "ru": "Russian", "sk": "Slovak", "sl": "Slovenian", "so": "Somali", "sq": "Albanian",
    "sr": "Serbian", "sv": "Swedish", "sw": "Swahili", "th": "Thai", "tr": "Turkish", "uk": "Ukrainian",
    "ur": "Urdu", "uz": "Uzbek", "vi": "Vietnamese", "zh": "Chinese",
}


def _language(info) -> Optional[str]:
    languages = info.get("languages")
    if isinstance(languages, list) and len(languages) == 1:
        return _LANGUAGES.get(languages[0])
    return None


@dataclass(frozen=True)
class Relation:
    """A relation between a country and a fact about it: its prompt, rephrasings, an optional portability prompt
    (the reverse question, answered by the country), and how countryinfo gives the fact."""

    name: str
    prompt: str
    rephrasings: Tuple[str, ...]
    reverse: Optional[str]
    fact: Callable


# A rephrasing tests whether an edit generalizes only if the unedited model retrieves the fact through it: each is
# one SmolLM2-135M answers right for at least half the facts it knows by the relation's prompt (checked by
# tests/test_edit.py). Two earlier ones failed that and were replaced: "{}'s capital is" (31% of the known
# capitals) by "In {}, the capital is" (92%), and "The language spoken in {} is" (0%: " a", " often", ...) by
# "In {}, the official language is" (93%).
RELATIONS: Dict[str, Relation] = {r.name: r for r in (
    Relation("capital", "The capital of {} is", ("In {}, the capital is", "The capital city of {} is"),
             "{} is the capital of", _capital),
    Relation("continent", "{} is a country on the continent of",
             ("{} is located on the continent of", "The country of {} lies on the continent of"), None, _continent),
    Relation("language", "The official language of {} is",
             ("{}'s official language is", "In {}, the official language is"), None, _language),
    Relation("demonym", "A person from {} is called", ("Someone from {} is called", "A citizen of {} is called"),
             None, _demonym),
)}

PROMPT = RELATIONS["capital"].prompt
REPHRASINGS = RELATIONS["capital"].rephrasings


def relation_facts(relation: str = "capital") -> List[Tuple[str, str]]:
    """(country, fact) for every country countryinfo gives the relation's fact for (one fact each)."""
    from countryinfo import CountryInfo

    get = RELATIONS[relation].fact
    facts = []
    for info in CountryInfo.all().values():
        value = get(info)
        if info.get("name") and value:
            facts.append((info["name"], value))
    return sorted(set(facts))


def capital_facts() -> List[Tuple[str, str]]:
    """(country, capital) for every country with one capital (a one-element list counts as one)."""
    return relation_facts("capital")


def known_facts(model, tokenizer, facts: Sequence[Tuple[str, str]], relation: str = "capital",
                template: Optional[str] = None) -> List[Tuple[str, str]]:
    """The facts whose whole answer is the model's greedy continuation of the relation's prompt (or of another
    `template` of it, e.g. one of its rephrasings)."""
    template = template or RELATIONS[relation].prompt
    prompts = [template.format(c) for c, _ in facts]
    answers = [metrics.encode(tokenizer, " " + a, False) for _, a in facts]
    matches = metrics.token_matches(model, tokenizer, prompts, answers)
    return [f for f, m in zip(facts, matches) if all(m)]


def counterfactual_edits(known: Sequence[Tuple[str, str]], n: int, seed: int = 0, locality: int = 20,
                         relation: str = "capital", neighbors: int = 20) -> Tuple[List[Edit], List[str]]:
    """n edits, each moving a known country's fact to another known country's (different) fact, with its subject,
    rephrasings, a portability prompt where the relation has a reverse form ("<new capital> is the capital of" ->
    the country), and up to `neighbors` held-out neighbours: other known countries of the same relation with their
    true answers, which must not change. Also up to `locality` prompts about other known facts (for the
    agreement metric)."""
    if len(known) < n + 2:
        raise ValueError(f"need at least {n + 2} known facts, have {len(known)}")
    rel = RELATIONS[relation]
    rng = random.Random(seed)
    chosen = rng.sample(list(known), len(known))
    edited, rest = chosen[:n], chosen[n:]
    edits = []
    for country, fact in edited:
        new = rng.choice(sorted({f for _, f in known if f != fact}))
        portability = [(rel.reverse.format(new), country)] if rel.reverse else []
        nearby = rng.sample(rest, min(neighbors, len(rest)))
        edits.append(Edit(rel.prompt.format(country), new, [r.format(country) for r in rel.rephrasings],
                          portability, subject=country,
                          neighbors=[(rel.prompt.format(c), f) for c, f in nearby]))
    return edits, [rel.prompt.format(c) for c, _ in rest[:locality]]
