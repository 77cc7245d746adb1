"""apply_edits: write new facts into a causal LM with RoseLoRA (or the LoRA / FT-L baselines) and measure them."""

import contextlib
import functools
import math
import random
import re
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..adapters import RoseLoraConfig, adapter_layers, config_for, find_targets, get_method, inject, merge
from ..adapters.model import restored_on_failure
from ..progress import progress_bar
from ..training import pruner_for
from . import metrics

EDIT_METHODS = ("roselora", "lora", "ft-l")


_QUESTION_WORDS = {"The", "A", "An", "What", "Who", "Which", "Where", "When", "Why", "How", "In", "On", "At", "Is",
                   "Was", "Are", "Were", "Did", "Does", "Do", "Of", "This", "That", "It", "Its"}
_CONNECTORS = {"of", "and", "de", "da", "do", "du", "des", "del", "la", "le", "the", "van", "von", "y", "e", "&"}


def infer_subject(prompt: str) -> Optional[str]:
    """The edit's subject when the request does not name it: the longest run of capitalised words (joined by
    connectors such as "of" or "and"), not counting a sentence-initial article or question word; ties go to the
    later run (relation prompts name the relation first). None when the prompt has no capitalised name."""
    words = re.findall(r"[^\s?!.,;:]+", prompt)
    runs, current = [], []
    for i, w in enumerate(words):
        capital = w[:1].isupper() or w[:1].isdigit()
        if capital and not (i == 0 and w in _QUESTION_WORDS):
            current.append(w)
        elif current and w in _CONNECTORS and i + 1 < len(words) and words[i + 1][:1].isupper():
            current.append(w)
        else:
            if current:
                runs.append(current)
            current = []
    if current:
        runs.append(current)
    if not runs:
        return None
    run = list(runs[max(range(len(runs)), key=lambda k: (len(runs[k]), k))])
    for suffix in ("'s", "’s", "'", "’"):  # a possessive is not part of the name
        if run[-1].endswith(suffix) and len(run[-1]) > len(suffix):
            run[-1] = run[-1][: -len(suffix)]
            break
    subject = " ".join(run)
    return subject if subject in prompt else None


def _pairs(value, what: str, prompt: str) -> List[Tuple[str, str]]:
    """(prompt, answer) pairs from [(p, a)], [[p, a]] or [{"prompt", "answer" | "ground_truth"}]."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise ValueError(f"{what} of {prompt!r} must be a list of (prompt, answer) pairs, got {value!r}")
    pairs = []
    for p in value:
        if isinstance(p, dict):
            answer = p.get("answer", p.get("ground_truth"))
            p = (p.get("prompt"), answer[0] if isinstance(answer, list) and answer else answer)
        pair = tuple(p) if isinstance(p, (list, tuple)) else ()
        if len(pair) != 2 or not all(isinstance(x, str) and x.strip() for x in pair):
            raise ValueError(f"{what} of {prompt!r} must be a list of (prompt, answer) pairs of non-empty strings "
                             f"(or {{'prompt', 'answer'}} objects), got {p!r}")
        pairs.append(pair)
    return pairs


@dataclass
class Edit:
    """A new fact: after ``prompt`` the model should say ``target``.

    ``subject`` is what the fact is about (EasyEdit's field; it must occur in the prompt). When it is not given it
    is inferred (:func:`infer_subject`); what it is used for -- forming, from generic text, neighbour prompts that
    must not change -- is skipped for an edit with no recognisable subject. ``rephrasings`` test generalization,
    ``portability`` holds (related prompt, expected answer) pairs, ``neighbors`` (prompt, true answer) pairs of the
    same relation about other subjects, which must keep their answers (strict neighbourhood locality). A target
    without a leading space gets one, so that it continues the prompt as a new word."""

    prompt: str
    target: str
    rephrasings: Sequence[str] = ()
    portability: Sequence[Tuple[str, str]] = ()
    subject: Optional[str] = None
    neighbors: Sequence[Tuple[str, str]] = ()

    def __post_init__(self):
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError(f"edit prompt must be a non-empty string, got {self.prompt!r}")
        if not isinstance(self.target, str) or not self.target.strip():
            raise ValueError(f"edit target for {self.prompt!r} must be a non-empty string, got {self.target!r}")
        if not self.target.startswith(" "):
            self.target = " " + self.target
        if isinstance(self.rephrasings, str) or not all(isinstance(r, str) and r.strip() for r in self.rephrasings):
            raise ValueError(f"rephrasings of {self.prompt!r} must be a list of non-empty strings, "
                             f"got {self.rephrasings!r}")
        self.rephrasings = list(self.rephrasings)
        self.portability = _pairs(self.portability, "portability", self.prompt)
        self.neighbors = _pairs(self.neighbors, "neighbors", self.prompt)
        if self.subject is None:
            self.subject = infer_subject(self.prompt)
        elif not isinstance(self.subject, str) or not self.subject.strip() or self.subject not in self.prompt:
            raise ValueError(f"the subject of an edit must occur in its prompt; {self.subject!r} is not in "
                             f"{self.prompt!r}")

    @property
    def template(self) -> Optional[str]:
        """The prompt with its subject as "{}" (the relation, to fill with other subjects), or None."""
        return _as_template(self.prompt, self.subject)

    @property
    def rephrasing_templates(self) -> List[str]:
        """The rephrasings that name the subject, with it as "{}" (the relation in other words)."""
        return [t for t in (_as_template(r, self.subject) for r in self.rephrasings) if t]

    def rephrased_neighbors(self) -> List[Tuple[str, str]]:
        """The neighbours asked in the edit's other words: each neighbour prompt that is the edit's template filled
        with another subject, put into each of :attr:`rephrasing_templates` with that subject (same answer)."""
        split, templates = _split_at(self.prompt, self.subject), self.rephrasing_templates
        if split is None or not templates:
            return []
        before, after = split
        pairs = []
        for prompt, answer in self.neighbors:
            if prompt.startswith(before) and prompt.endswith(after) and len(prompt) > len(before) + len(after):
                other = prompt[len(before):len(prompt) - len(after)]
                pairs.extend((t.format(other), answer) for t in templates)
        return pairs

    @staticmethod
    def from_dict(d: Dict) -> "Edit":
        """From this package's JSONL fields (prompt, target, subject, rephrasings, portability, neighbors) or
        EasyEdit's (prompt / src, target_new / alt, subject, rephrase_prompt / rephrase, portability,
        locality_prompt + locality_ground_truth, or a locality dict of {prompt, ground_truth} lists)."""
        if not isinstance(d, dict):
            raise ValueError(f"an edit must be a JSON object, got {type(d).__name__}")
        prompt = d.get("prompt", d.get("src", ""))
        target = d.get("target", d.get("target_new", d.get("alt", "")))
        if isinstance(target, dict):  # ROME's counterfact: {"str": ...}
            target = target.get("str", "")
        rephrasings = d.get("rephrasings", d.get("rephrase_prompt", d.get("rephrase", ())))
        if isinstance(rephrasings, str):
            rephrasings = [rephrasings] if "rephrasings" not in d else rephrasings  # EasyEdit: one string
        portability = d.get("portability", ())
        if isinstance(portability, dict):  # EasyEdit: {"Reasoning": [...], "Subject_Aliasing": [...]}
            portability = [p for group in portability.values() for p in (group if isinstance(group, list) else [group])]
        if "portability_prompt" in d:
            portability = _zip_pairs(d["portability_prompt"], d.get("portability_ground_truth"), "portability")
        neighbors = d.get("neighbors", ())
        locality = d.get("locality")
        if isinstance(locality, dict):  # EasyEdit: {"Relation_Specificity": [{"prompt", "ground_truth"}], ...}
            neighbors = [p for group in locality.values() for p in (group if isinstance(group, list) else [group])]
        if "locality_prompt" in d:
            neighbors = _zip_pairs(d["locality_prompt"], d.get("locality_ground_truth"), "locality")
        if "loc" in d and "loc_ans" in d:  # ZsRE
            neighbors = _zip_pairs(d["loc"], d["loc_ans"], "loc")
        return Edit(prompt, target, rephrasings, portability, d.get("subject"), neighbors)


def _split_at(text: str, subject: Optional[str]) -> Optional[Tuple[str, str]]:
    """(what comes before, what comes after) the last occurrence of `subject` in `text`, or None if it has none."""
    i = text.rfind(subject) if subject else -1
    return None if i < 0 else (text[:i], text[i + len(subject):])


def _as_template(text: str, subject: Optional[str]) -> Optional[str]:
    """`text` with the last occurrence of `subject` as "{}" (other braces escaped), or None if it has none."""
    split = _split_at(text, subject)
    if split is None:
        return None
    return "{}".join(part.replace("{", "{{").replace("}", "}}") for part in split)


def _zip_pairs(prompts, answers, what: str) -> List[Tuple[str, str]]:
    """EasyEdit's parallel fields: a prompt and its ground truth, or lists of them."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(prompts, list) or not isinstance(answers, list) or len(prompts) != len(answers):
        raise ValueError(f"{what}_prompt and {what}_ground_truth must be strings or lists of one length, got "
                         f"{prompts!r} and {answers!r}")
    return [(p, a[0] if isinstance(a, list) and a else a) for p, a in zip(prompts, answers)]


AFTER_CONTEXTS = ("own_answer", "new_answer")
_MAX_OWN_ANSWER = 8  # tokens
_ANSWER_END = re.compile(r"[.,;:!?\n]")


@dataclass
class EditConfig:
    method: str = "roselora"
    steps: int = 40
    lr: float = 2e-3
    r: int = 8
    alpha: float = 16.0
    target_modules: Sequence[str] = ("mlp.down_proj",)
    sparsity: float = 0.95  # roselora: fraction of zeros in each row of A / column of B at the end
    ft_module: str = "model.layers.8.mlp.down_proj"  # ft-l: the one weight that is fine-tuned
    ft_max_change: float = 5e-3  # ft-l: ROME's L∞ constraint on the change of each weight
    merge: bool = False  # fold the adapters into the weights before returning
    # Edits trained together; the groups are applied one after another, each holding the earlier groups' edits in
    # place (preservation term) and merged before the next (None: all edits in one group).
    group_size: Optional[int] = 1
    layers: Optional[Tuple[int, int]] = None  # adapt only decoder layers first..last (None: every layer)
    # The editing recipe around the method (benchmarks/python/knowledge_editing.py --ablation measures each lever):
    preserve: float = 20.0  # weight of the KL terms (see _Preservation)
    # neighbour prompts per group of edits: each edit's template filled with subjects from generic text, held
    # against the unedited model; with several groups each also holds this many of the others', drawn per step
    neighbors: int = 32
    similar_neighbors: float = 0.5  # the share of them most like the edit's subject (the rest: random titles)
    neighbor_pool: int = 4096  # Wikipedia titles searched for the similar ones
    # each neighbour subject also in each of the request's rephrasings (Edit.rephrasing_templates), not only in
    # its prompt's template: the relation held in the other words the request gives
    neighbor_rephrasings: bool = False
    preserve_after: int = 16  # KL also on the unedited model's next tokens after the answer (0: off)
    # what those tokens follow: "new_answer" -- the prompt and the new target, i.e. the edited model goes on as the
    # unedited one does after the counterfactual statement; "own_answer" -- the prompt and the model's own answer
    # (its greedy continuation up to the first punctuation or line break; held up to where it names that answer
    # again), i.e. as it did after its old answer: more fluent after a counterfactual that the unedited model
    # would go on repeating, but the edit then also changes what follows the relation's other answers (locality
    # and strict locality fall on the language relation; the ablation file). An edit whose own answer has no end
    # within ``_MAX_OWN_ANSWER`` tokens, or is named again at once, uses "new_answer".
    after: str = "new_answer"
    prefixes: int = 4  # training copies of each prompt behind a short prefix of generic text
    early_stop: bool = True  # stop once every target token has probability >= stop_probability in every row
    stop_probability: float = 0.9
    # with early_stop: an edit that has not held after `steps` trains up to this many steps more (RoseLoRA at its
    # final sparsity; the schedule still ends at 0.6 * steps). Without early_stop every edit trains `steps`.
    extra_steps: int = 20
    # in the edit's copies behind the generic prefixes the adapters' update acts only at the subject's last token
    # (ROME's key; the prompt's own row, the preservation term and inference see it everywhere): more of the new
    # fact is written into the subject's representation. Holds the relation under other phrasings (neighbourhood,
    # rephrased), at a cost in generalization -- an option, not the default (adapter methods, prefixes > 0)
    subject_update: bool = False
    generation_tokens: int = 32  # for fluency
    locality_tokens: int = 3
    seed: int = 0

    def __post_init__(self):
        if self.method not in EDIT_METHODS:
            raise ValueError(f"method must be one of {EDIT_METHODS}, got {self.method!r}")
        if self.steps < 1 or not self.lr > 0:
            raise ValueError("steps must be >= 1 and lr > 0")
        if self.after not in AFTER_CONTEXTS:
            raise ValueError(f"after must be one of {AFTER_CONTEXTS}, got {self.after!r}")
        if min(self.preserve, self.neighbors, self.prefixes, self.preserve_after, self.extra_steps) < 0:
            raise ValueError("preserve, neighbors, prefixes, preserve_after and extra_steps must be >= 0")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"group_size must be >= 1 or None (all edits together), got {self.group_size!r}")
        if not 0 < self.stop_probability < 1:
            raise ValueError(f"stop_probability must be in (0, 1), got {self.stop_probability!r}")
        if not 0 <= self.similar_neighbors <= 1 or self.neighbor_pool < 1:
            raise ValueError(f"similar_neighbors must be in [0, 1] and neighbor_pool >= 1, got "
                             f"{self.similar_neighbors!r} and {self.neighbor_pool!r}")
        if self.preserves_nothing(one_group=self.group_size is None):
            raise ValueError("preserve > 0 needs something to preserve: neighbors > 0, preserve_after > 0 or "
                             "group_size (earlier edits)")
        if self.subject_update and (self.method == "ft-l" or self.prefixes == 0):
            raise ValueError("subject_update applies to the adapter methods (roselora, lora), not ft-l, and needs "
                             "prefixes > 0 (the copies it trains at the subject)")
        if self.layers is not None:
            first, last = self.layers
            if not 0 <= first <= last:
                raise ValueError(f"layers must be (first, last) with 0 <= first <= last, got {self.layers!r}")

    def preserves_nothing(self, one_group: bool) -> bool:
        """preserve > 0 with nothing to preserve: no neighbour prompts, no tokens after the answers and, in one
        group of edits, no earlier edits to hold."""
        return self.preserve > 0 and self.neighbors == 0 and self.preserve_after == 0 and one_group


@dataclass
class EditMetrics:
    method: str
    edits: int
    edit_success: float  # token accuracy of the new targets
    edit_exact: float  # fraction of prompts whose whole target is the greedy continuation
    generalization: float
    locality: float  # EasyEdit-style: token agreement of unrelated prompts' continuations with the unedited ones
    portability: float
    fluency: float
    fluency_before: float  # the unedited model's, after the same prompts (its own answers)
    weights_changed: int
    # strict neighbourhood locality: the share of the edits' neighbours (same relation, other subjects) whose
    # greedy continuation still begins with their true answer (NaN when the edits name no neighbours)
    neighborhood: float = math.nan
    # the unedited model's fluency after each prompt *followed by its new target*: what the counterfactual
    # statement alone does to what follows, apart from the edit (NaN for results saved before it existed)
    fluency_counterfactual: float = math.nan
    seconds: float = math.nan
    per_edit: List[Dict] = field(default_factory=list)
    # the same neighbours asked in each edit's rephrasings (Edit.rephrased_neighbors), over those the unedited
    # model answered right: an edit may leave the relation alone in its own words and still spread along others
    neighborhood_rephrased: float = math.nan
    # fluency after the edits' rephrasings, which no part of the recipe trains on (the prompt's own continuation
    # is held by the preserve_after term), and the unedited model's there (NaN: no rephrasings)
    fluency_rephrased: float = math.nan
    fluency_rephrased_before: float = math.nan

    FLUENCY_HEADER = "fluency (before; unedited after the new answer)"

    def as_row(self) -> Dict:
        d = asdict(self)
        d.pop("per_edit")
        return d

    def fluency_cell(self) -> str:
        """The fluency as the tables show it: after the edit (before it; the counterfactual reference)."""
        return f"{self.fluency:.2f} ({self.fluency_before:.2f}; {self.fluency_counterfactual:.2f})"

    def fluency_rephrased_cell(self) -> str:
        return f"{self.fluency_rephrased:.2f} ({self.fluency_rephrased_before:.2f})"


def _validate(edits: Sequence[Edit], tokenizer) -> List[List[int]]:
    if not edits:
        raise ValueError("no edits given")
    ids = []
    for e in edits:
        t = metrics.encode(tokenizer, e.target, False)
        if not t:
            raise ValueError(f"edit target {e.target!r} for {e.prompt!r} tokenizes to nothing")
        ids.append(t)
    return ids


def _edit_batch(tokenizer, edits, target_ids, device, prefixes: Sequence[str] = (), at_subject: bool = False):
    """Each edit's prompt followed by its target (loss on the target only), alone and behind each prefix; and,
    with `at_subject` (``EditConfig.subject_update``), a (rows, length) mask that is 1 at the subject's last token
    of each row behind a prefix and 1 everywhere in the prompt's own row and in the rows of an edit with no
    subject (else None)."""
    seqs, labels, subject_ends = [], [], []
    for e, t in zip(edits, target_ids):
        split = _split_at(e.prompt, e.subject) if at_subject else None
        for prefix in ("", *prefixes):
            seq, _ = _joined(metrics.encode(tokenizer, prefix + e.prompt, True), t)
            seqs.append(seq)
            labels.append([-100] * (len(seq) - len(t)) + t)
            subject_ends.append(None if split is None or not prefix else
                                _last_token(tokenizer, prefix + split[0] + e.subject, seq))
    ids, mask = metrics.pad_batch(seqs, tokenizer.pad_token_id or 0)
    lab, _ = metrics.pad_batch(labels, -100)
    batch = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": lab.to(device)}
    if not at_subject:
        return batch, None
    positions = torch.zeros(ids.shape)
    for row, end in enumerate(subject_ends):
        if end is None:
            positions[row] = 1
        else:
            positions[row, end] = 1
    return batch, positions.to(device)


def _last_token(tokenizer, text: str, sequence: Sequence[int]) -> int:
    """The position in `sequence` (the tokens of a longer text that begins with `text`) of the last token that
    `text` reaches into."""
    n = len(metrics.encode(tokenizer, text, True))
    return min(len(sequence), max(n, 1)) - 1


@functools.lru_cache(maxsize=1)
def _titles() -> Tuple[str, ...]:
    """The titles of the shipped Wikipedia summaries that can stand as a subject (no "(disambiguation)"), sorted."""
    from ..assets.text import wiki_summaries

    return tuple(sorted({s["title"] for s in wiki_summaries() if s.get("title") and "(" not in s["title"]}))


def generic_subjects(n: int, seed: int = 0, exclude: Sequence[str] = ()) -> List[str]:
    """n subjects from generic text -- titles of the shipped Wikipedia summaries -- to fill an edit's template
    with: what the edit must leave alone. No table of facts is consulted."""
    if n == 0:
        return []
    excluded = set(exclude)
    titles = [t for t in _titles() if t not in excluded]
    return random.Random(seed).sample(titles, min(n, len(titles)))


class _StopForward(Exception):
    pass


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder (or encoder) blocks: its longest ModuleList."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError("the model has no ModuleList of layers to read subject representations from")
    return max(lists, key=len)


@torch.no_grad()
def subject_representations(model: nn.Module, tokenizer, subjects: Sequence[str], layer: Optional[int] = None,
                            batch_size: int = 256) -> torch.Tensor:
    """(len(subjects), hidden) unit vectors: the hidden state of each subject's last token (the subject alone,
    as a new word) after decoder block `layer` (default: an eighth of the way up, where the subject's tokens have
    been read into one representation). The forward stops at that block."""
    blocks = _decoder_layers(model)
    layer = max(1, len(blocks) // 8) if layer is None else layer
    if not 0 <= layer < len(blocks):
        raise ValueError(f"layer must be in [0, {len(blocks)}), got {layer}")
    device = next(model.parameters()).device
    captured = []

    def hook(module, args, output):
        captured.append(output[0] if isinstance(output, tuple) else output)
        raise _StopForward

    handle = blocks[layer].register_forward_hook(hook)
    out = []
    try:
        for start in range(0, len(subjects), batch_size):
            seqs = [metrics.encode(tokenizer, " " + s.strip(), True) for s in subjects[start:start + batch_size]]
            ids, mask = metrics.pad_batch(seqs, tokenizer.pad_token_id or 0)
            captured.clear()
            try:
                model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
            except _StopForward:
                pass
            last = torch.tensor([len(q) - 1 for q in seqs], device=device)
            h = captured[0][torch.arange(len(seqs), device=device), last]
            out.append(torch.nn.functional.normalize(h.float(), dim=-1).cpu())
    finally:
        handle.remove()
    return torch.cat(out)


def similar_subjects(model: nn.Module, tokenizer, subjects: Sequence[str], n: int, pool: int = 2048,
                     seed: int = 0, exclude: Sequence[str] = (), layer: Optional[int] = None) -> List[List[str]]:
    """For each subject, the n titles of generic text (a pool of the shipped Wikipedia titles) that the model
    represents most like it (cosine of :func:`subject_representations`): the other subjects an edit of it is most
    likely to spill onto, and so the ones a preservation term should hold in place. No table of facts is
    consulted; `exclude` (e.g. a benchmark's held-out subjects) never appears."""
    if n == 0 or not subjects:
        return [[] for _ in subjects]
    candidates = generic_subjects(pool, seed, exclude=[*subjects, *exclude])
    reps = subject_representations(model, tokenizer, candidates, layer)
    query = subject_representations(model, tokenizer, subjects, layer)
    nearest = (query @ reps.T).topk(min(n, len(candidates)), dim=-1).indices
    return [[candidates[int(j)] for j in row] for row in nearest]


def generic_prefixes(n: int, seed: int = 0, words: int = 8) -> List[str]:
    """n short prefixes of generic text (the first words of Wikipedia summaries, ending in '. '): training the
    edit behind them makes it hold in other contexts, as ROME's context templates do."""
    if n == 0:
        return []
    from ..assets.text import wiki_summaries

    extracts = [s["extract"] for s in wiki_summaries() if len(s.get("extract", "").split()) > words]
    chosen = random.Random(seed + 1).sample(extracts, min(n, len(extracts)))
    return [" ".join(x.split()[:words]).rstrip(".,;:") + ". " for x in chosen]


def neighbour_prompts(model, tokenizer, edits: Sequence[Edit], config: "EditConfig", unseen: Sequence[str] = (),
                      per_edit: Optional[int] = None) -> List[str]:
    """The prompts the preservation term holds in place: each edit's template filled with other subjects from
    generic text -- the `similar_neighbors` share of them the titles the model represents most like the edit's
    subject (:func:`similar_subjects`), the rest drawn at random -- ``per_edit`` per edit (default: the
    ``config.neighbors`` shared among the edits). Subjects that occur in an edit's own subject or in any of the
    `unseen` prompts (what the edit is measured on) are never used."""
    return [p for row in _neighbours_per_edit(model, tokenizer, edits, config, unseen, per_edit) for p in row]


def _neighbours_per_edit(model, tokenizer, edits, config, unseen=(), per_edit=None) -> List[List[str]]:
    """:func:`neighbour_prompts` of each edit ([] for an edit with no subject)."""
    with_template = [e for e in edits if e.template]
    if not with_template or config.neighbors == 0:
        return [[] for _ in edits]
    titles = [t for t in _titles() if any(t in p for p in unseen) or any(t in e.subject for e in with_template)]
    per_edit = per_edit or max(1, math.ceil(config.neighbors / len(with_template)))
    n_similar = round(per_edit * config.similar_neighbors)
    similar = similar_subjects(model, tokenizer, [e.subject for e in with_template], n_similar,
                               pool=config.neighbor_pool, seed=config.seed, exclude=titles) if n_similar else None
    taken = {s for row in similar or () for s in row}
    randoms = iter(generic_subjects(len(with_template) * (per_edit - n_similar), config.seed + 1,
                                    exclude=[*titles, *taken]))
    similar_of = dict(zip(map(id, with_template), similar or ()))
    prompts = []
    for e in edits:
        if not e.template:
            prompts.append([])
            continue
        subjects = [*similar_of.get(id(e), ()), *(next(randoms) for _ in range(per_edit - n_similar))]
        forms = [e.template, *(e.rephrasing_templates if config.neighbor_rephrasings else ())]
        prompts.append([form.format(subject) for subject in subjects for form in forms])
    return prompts


class _KL:
    """KL(unedited || edited) of the next-token distributions at chosen positions of fixed token sequences, averaged
    over the positions. The unedited distributions are computed once, at construction: at the same positions of the
    same sequences, or with ``reference=(sequences, positions)`` at as many positions of other sequences (the
    distributions the edited model is held to there)."""

    def __init__(self, model, sequences, positions, pad_id: int, device, reference=None):
        self._place(sequences, positions, pad_id, device)
        source = self
        if reference is not None:
            if [len(c) for c in reference[1]] != [len(c) for c in positions]:
                raise ValueError("reference must have as many positions per sequence as the term")
            source = object.__new__(type(self))
            source._place(*reference, pad_id, device)
        n = len(source.batch["input_ids"])
        with torch.no_grad():  # in chunks: the logits of hundreds of prompts at once would take gigabytes
            self.base = torch.cat([source.subset(range(i, min(i + 64, n))).log_probs(model)
                                   for i in range(0, n, 64)])

    def _place(self, sequences, positions, pad_id: int, device):
        ids, mask = metrics.pad_batch(sequences, pad_id)
        self.batch = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
        self.rows = torch.tensor([i for i, cols in enumerate(positions) for _ in cols], device=device)
        self.cols = torch.tensor([c for cols in positions for c in cols], device=device)
        self.base = None

    def log_probs(self, model):
        logits = model(**self.batch, use_cache=False).logits
        return torch.log_softmax(logits[self.rows, self.cols].float(), -1)

    def __call__(self, model):
        return (self.base.exp() * (self.base - self.log_probs(model))).sum(-1).mean()

    def subset(self, sequences: Sequence[int]) -> "_KL":
        """The same term (same reference distributions) on some of its sequences only."""
        new = object.__new__(type(self))
        keep = torch.tensor(list(sequences), dtype=torch.long, device=self.rows.device)
        new.batch = {k: v[keep] for k, v in self.batch.items()}
        renumber = torch.full((len(self.batch["input_ids"]),), -1, dtype=torch.long, device=keep.device)
        renumber[keep] = torch.arange(len(keep), device=keep.device)
        picked = renumber[self.rows] >= 0
        new.rows, new.cols = renumber[self.rows][picked], self.cols[picked]
        new.base = None if self.base is None else self.base[picked]
        return new


class _Sampled:
    """A KL term on ``n`` of a term's sequences drawn afresh at every call (seeded)."""

    def __init__(self, term: _KL, sequences: Sequence[int], n: int, seed: int):
        self.term, self.sequences, self.n = term, list(sequences), n
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, model):
        chosen = torch.randperm(len(self.sequences), generator=self.generator)[:self.n]
        return self.term.subset([self.sequences[int(i)] for i in chosen])(model)


class _Neighbours:
    """Every group's neighbour prompts (:func:`neighbour_prompts`, ``config.neighbors`` per group), chosen once per
    call, with the *unedited* model's next-token distributions at their ends. A group holds its own neighbours and,
    when there are several groups, ``config.neighbors`` of the other groups' drawn afresh at every step: so the
    drift each edit leaves on the relation does not compound over the later ones, but is pulled back."""

    def __init__(self, model, tokenizer, edits, groups, config, device, unseen):
        per_edit = max(1, math.ceil(config.neighbors / len(groups[0])))
        rows = _neighbours_per_edit(model, tokenizer, edits, config, unseen, per_edit)
        group_of = {i: k for k, g in enumerate(groups) for i in g}
        seen, prompts, self.group = set(), [], []
        for i, row in enumerate(rows):
            for p in row:
                if p not in seen:
                    seen.add(p)
                    prompts.append(p)
                    self.group.append(group_of[i])
        self.config, self.kl = config, None
        if prompts:
            seqs = [metrics.encode(tokenizer, p, True) for p in prompts]
            self.kl = _KL(model, seqs, [[len(q) - 1] for q in seqs], tokenizer.pad_token_id or 0, device)

    def terms(self, k: int) -> list:
        """The KL terms of group k: its own neighbours, and a fresh sample of the others' at each step."""
        if self.kl is None:
            return []
        own = [i for i, g in enumerate(self.group) if g == k]
        others = [i for i, g in enumerate(self.group) if g != k]
        terms = [self.kl.subset(own)] if own else []
        if others and self.config.neighbors:
            terms.append(_Sampled(self.kl, others, self.config.neighbors, self.config.seed + k))
        return terms


def _joined(prompt_ids: Sequence[int], answer_ids: Sequence[int]) -> Tuple[List[int], List[int]]:
    """prompt + answer token ids, and the positions whose next-token prediction is an answer token."""
    return [*prompt_ids, *answer_ids], list(range(len(prompt_ids) - 1, len(prompt_ids) - 1 + len(answer_ids)))


def _own_answer_end(tokenizer, continuation: Sequence[int]) -> Optional[int]:
    """How many tokens of a model's own continuation of a prompt are its answer: those before the first token that
    holds punctuation or a line break (None: the first token does, or none of the first ``_MAX_OWN_ANSWER + 1``)."""
    for k, token in enumerate(continuation[:_MAX_OWN_ANSWER + 1]):
        if _ANSWER_END.search(tokenizer.decode([token])):
            return k or None
    return None


def _before_recurrence(tokenizer, tokens: Sequence[int], answer: str) -> List[int]:
    """The tokens before the first recurrence of ``answer`` in their text: what follows the model's own answer is
    held only up to where it says that answer again (after the new one, the model should not be taught to)."""
    for end in range(len(tokens)):
        if answer in tokenizer.decode(tokens[:end + 1]):
            start = max(s for s in range(end + 1) if answer in tokenizer.decode(tokens[s:end + 1]))
            return list(tokens[:start])
    return list(tokens)


def _after_answer(model, tokenizer, edits, target_ids, config):
    """The ``preserve_after`` term's (sequence, positions) pairs -- each prompt, its new target and the tokens held
    after it -- and the reference pairs the model's distributions are taken from, one per pair (None: the pairs
    themselves). With ``config.after="own_answer"`` the tokens are the model's own continuation after its own
    answer (from its greedy continuation of the prompt; :func:`_own_answer_end`), up to where it repeats that
    answer, and the reference is the prompt with that answer; otherwise, or where the model's answer has no end or
    is repeated at once, they are its continuation after the new target, there."""
    n = config.preserve_after
    prompts = [metrics.encode(tokenizer, e.prompt, True) for e in edits]
    pairs, reference = [], []
    if config.after == "own_answer":
        counterfactual = []
        own = metrics.continue_ids(model, tokenizer, prompts, _MAX_OWN_ANSWER + n)
        for i, (prompt, target, continuation) in enumerate(zip(prompts, target_ids, own)):
            k = _own_answer_end(tokenizer, continuation)
            after = [] if k is None else \
                _before_recurrence(tokenizer, continuation[k:k + n], tokenizer.decode(continuation[:k]).strip())
            if not after:
                counterfactual.append(i)
                continue
            pairs.append(_joined(prompt + list(target), after))
            reference.append(_joined(prompt + continuation[:k], after))
    else:
        counterfactual = list(range(len(prompts)))
    stems = [prompts[i] + list(target_ids[i]) for i in counterfactual]
    for stem, after in zip(stems, metrics.continue_ids(model, tokenizer, stems, n)):
        if after:
            pairs.append(_joined(stem, after))
    return pairs, (reference + pairs[len(reference):] if reference else None)


class _Preservation:
    """What the edit must leave alone, as KL terms (weight ``config.preserve``): the ``held`` terms (the neighbour
    prompts, :class:`_Neighbours`, against the unedited model); the ``preserve_after`` tokens after each prompt's
    answer (:func:`_after_answer`: after its new target the edited model goes on as the model does after that
    target, or, with ``config.after="own_answer"``, as it did after its own answer); and, when edits are applied
    in groups (``config.group_size``), the distributions of the ``earlier`` groups' (edit, target ids) at their
    targets, so that a later edit does not undo an earlier one (these two against the model before this group)."""

    def __init__(self, model, tokenizer, edits, target_ids, config, device, held: Sequence = (),
                 earlier: Sequence[Tuple[Edit, List[int]]] = ()):
        self.terms, self.weight = [], config.preserve
        if config.preserve == 0:
            return
        self.terms.extend(held)
        pad = tokenizer.pad_token_id or 0
        if config.preserve_after:
            pairs, reference = _after_answer(model, tokenizer, edits, target_ids, config)
            if pairs:
                held = {} if reference is None else {"reference": list(map(list, zip(*reference)))}
                self.terms.append(_KL(model, *map(list, zip(*pairs)), pad, device, **held))
        if earlier:
            pairs = [_joined(metrics.encode(tokenizer, e.prompt, True), t) for e, t in earlier]
            self.terms.append(_KL(model, *map(list, zip(*pairs)), pad, device))

    def loss(self, model):
        if not self.terms:
            return None
        return self.weight * sum(term(model) for term in self.terms)


@contextlib.contextmanager
def _updates_only_at(model, positions: Optional[torch.Tensor]):
    """Within the block, each adapter's update acts on the (rows, length) `positions` mask only (1: the adapted
    output, 0: the base layer's): what a forward of the edit batch learns, it must learn where the mask is."""
    if positions is None:
        yield
        return
    weight = positions.unsqueeze(-1)

    def hook(layer, args, output):
        base = layer.base_layer(args[0])
        return base + weight.to(output.dtype) * (output - base)

    handles = [layer.register_forward_hook(hook) for _, layer in adapter_layers(model)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _train(model, params, batch, config, preservation=None, after_step=None, desc="editing", may_stop=None,
           positions=None):
    """Adam on the edit's loss (plus the preservation term); with early_stop, stop once every target token has
    probability >= `stop_probability` -- but not before `may_stop()` says so (RoseLoRA: once its pruning reached
    the target sparsity, so that an early stop never leaves a denser update) -- and go on for up to `extra_steps`
    more while it has not. With `positions` the adapters' updates act on the edit batch only where it is 1
    (:func:`_updates_only_at`); the preservation term sees them everywhere, as inference will."""
    opt = torch.optim.Adam(params, lr=config.lr)
    model.train()
    targets = batch["labels"][:, 1:]
    scored = targets != -100
    for _ in progress_bar(range(config.steps + (config.extra_steps if config.early_stop else 0)), desc):
        opt.zero_grad()
        with _updates_only_at(model, positions):
            out = model(**batch, use_cache=False)
        if config.early_stop and (may_stop is None or may_stop()):
            with torch.no_grad():  # every target token at probability >= stop_probability, in every training row
                logp = torch.log_softmax(out.logits[:, :-1].float(), -1)
                target_logp = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            if bool((target_logp[scored] >= math.log(config.stop_probability)).all()):
                break
        loss = out.loss
        kl = preservation.loss(model) if preservation is not None else None
        if kl is not None:
            loss = loss + kl
        loss.backward()
        opt.step()
        if after_step is not None:
            after_step()
    model.eval()


def _adapted_modules(model, config) -> List[str]:
    names = find_targets(model, list(config.target_modules))
    if config.layers is not None:
        first, last = config.layers

        def layer_of(name):
            numbers = [int(part) for part in name.split(".") if part.isdigit()]
            return numbers[0] if numbers else -1

        names = [n for n in names if first <= layer_of(n) <= last]
    if not names:
        raise ValueError(f"target_modules={list(config.target_modules)!r} with layers={config.layers!r} selects "
                         f"no module of the model")
    return names


def _adapter_edit(model, config, batch, preservation, at_subject=None) -> None:
    fields = dict(r=config.r, alpha=config.alpha, target_modules=_adapted_modules(model, config))
    if issubclass(get_method(config.method).config_class, RoseLoraConfig):  # the pruning schedule of an edit
        fields.update(sparsity=config.sparsity, beta=0.8, t_init=0, t_final=max(1, int(config.steps * 0.6)))
    adapter = config_for(config.method, **fields)
    inject(model, adapter)
    params = [p for p in model.parameters() if p.requires_grad]
    pruner = pruner_for(model, total_steps=config.steps)
    may_stop = (lambda: pruner.step_count >= pruner.t_final) if pruner else None
    _train(model, params, batch, config, preservation, pruner.step if pruner else None, f"{config.method} edit",
           may_stop, at_subject)


def _ft_l_edit(model, config, batch, preservation) -> None:
    """FT-L (ROME's baseline): fine-tune one MLP weight directly, each entry kept within ±ft_max_change (a failure
    is undone by the caller)."""
    for p in model.parameters():
        p.requires_grad_(False)
    weight = model.get_submodule(config.ft_module).weight
    original = weight.detach().clone()
    weight.requires_grad_(True)

    def constrain():
        with torch.no_grad():
            weight.copy_(original + (weight - original).clamp_(-config.ft_max_change, config.ft_max_change))

    _train(model, [weight], batch, config, preservation, constrain, "ft-l edit")
    weight.requires_grad_(False)


def _weights_changed_by_adapters(model) -> int:
    with torch.no_grad():
        return sum(metrics.nonzero_count(layer.get_delta_weight()) for _, layer in adapter_layers(model))


def _answer_ids(tokenizer, answer: str) -> List[int]:
    return metrics.encode(tokenizer, answer if answer.startswith(" ") else " " + answer, False)


def _answer_pairs(tokenizer, pairs: Sequence[Tuple[str, str]]) -> List[Tuple[str, List[int]]]:
    """(prompt, answer) pairs with each answer as its token ids."""
    return [(p, _answer_ids(tokenizer, a)) for p, a in pairs]


def _pair_matches(model, tokenizer, pairs: Sequence[Tuple[str, Sequence[int]]]) -> List[List[bool]]:
    """:func:`metrics.token_matches` of (prompt, answer token ids) pairs."""
    return metrics.token_matches(model, tokenizer, [p for p, _ in pairs], [a for _, a in pairs])


def _texts(tokenizer, token_lists) -> List[str]:
    return [tokenizer.decode(t, skip_special_tokens=True) for t in token_lists]


def _fluency_after(model, tokenizer, prompts: Sequence[str], tokens: int) -> float:
    """Fluency of the model's greedy `tokens` after each prompt (NaN without prompts)."""
    if not prompts:
        return math.nan
    return metrics.fluency(_texts(tokenizer, metrics.greedy_continuations(model, tokenizer, prompts, tokens)))


def _counterfactual_fluency(model, tokenizer, edits, target_ids, tokens: int) -> float:
    """Fluency of the model's own `tokens` after each prompt when they begin with the edit's new target (the rest
    its greedy continuation): the text an edited model that changed nothing else would produce."""
    texts = []
    for e, target in zip(edits, target_ids):
        rest = tokens - len(target)
        tail = metrics.continue_ids(model, tokenizer, [metrics.encode(tokenizer, e.prompt, True) + list(target)],
                                    rest)[0] if rest > 0 else []
        texts.append((list(target) + tail)[:tokens])
    return metrics.fluency(_texts(tokenizer, texts))


def apply_edits(model: nn.Module, tokenizer, edits: Sequence[Edit], config: Optional[EditConfig] = None,
                locality_prompts: Sequence[str] = ()) -> Tuple[nn.Module, EditMetrics]:
    """Apply all ``edits`` and measure them. Edits are trained in groups of ``config.group_size`` (default 1:
    one after another, each group held in place by the preservation term while the later ones are made; None:
    all together). Returns the edited model -- with the adapters attached when there was one group and
    ``config.merge`` is False, else merged -- and its :class:`EditMetrics`. ``locality_prompts`` are prompts
    unrelated to the edits whose continuations should not change. A failure leaves the model as it came."""
    config = config or EditConfig()
    edits = [e if isinstance(e, Edit) else Edit.from_dict(e) for e in edits]
    target_ids = _validate(edits, tokenizer)
    torch.manual_seed(config.seed)
    device = next(model.parameters()).device
    model.eval()
    before_locality = metrics.greedy_continuations(model, tokenizer, locality_prompts, config.locality_tokens)
    gen_prompts = [e.prompt for e in edits]
    fluency_before = _fluency_after(model, tokenizer, gen_prompts, config.generation_tokens)
    fluency_counterfactual = _counterfactual_fluency(model, tokenizer, edits, target_ids, config.generation_tokens)
    reph = [(r, t) for e, t in zip(edits, target_ids) for r in e.rephrasings]
    reph_prompts = [r for r, _ in reph]
    fluency_rephrased_before = _fluency_after(model, tokenizer, reph_prompts, config.generation_tokens)
    # the neighbours in the edits' rephrasings, as far as the unedited model answers them right
    rephrased = _answer_pairs(tokenizer, [x for e in edits for x in e.rephrased_neighbors()])
    rephrased = [pair for pair, m in zip(rephrased, _pair_matches(model, tokenizer, rephrased)) if all(m)]

    prefixes = generic_prefixes(config.prefixes, config.seed)
    group = config.group_size or len(edits)
    groups = [list(range(i, min(i + group, len(edits)))) for i in range(0, len(edits), group)]
    if config.preserves_nothing(one_group=len(groups) == 1):
        raise ValueError("preserve > 0 but this call has nothing to preserve: with neighbors=0, preserve_after=0 and "
                         "one group of edits there are no neighbour prompts, answers' continuations or earlier "
                         "edits; set preserve=0 or neighbors / preserve_after > 0")
    t0 = time.perf_counter()
    # What the edits are measured on (their neighbours, the locality prompts) and every edit's subject are never
    # among the preserved prompts.
    unseen = [*locality_prompts, *(p for e in edits for p, _ in e.neighbors), *(e.subject for e in edits if e.subject)]
    names = [config.ft_module] if config.method == "ft-l" else _adapted_modules(model, config)
    weights = [model.get_submodule(n).weight for n in names]
    merged = config.method != "ft-l" and (config.merge or len(groups) > 1)  # adapters folded in after each group
    neighbours = _Neighbours(model, tokenizer, edits, groups, config, device, unseen) if config.preserve else None
    # A failure while editing (a bad loss, an interrupt) leaves the model as it came: no adapters, flags, weights.
    with restored_on_failure(model, values=weights) as originals:
        for k, g in enumerate(groups):
            sub, ids = [edits[i] for i in g], [target_ids[i] for i in g]
            batch, at_subject = _edit_batch(tokenizer, sub, ids, device, prefixes, config.subject_update)
            earlier = [(edits[i], target_ids[i]) for h in groups[:k] for i in h]
            held = neighbours.terms(k) if neighbours else []
            preservation = _Preservation(model, tokenizer, sub, ids, config, device, held, earlier)
            if config.method == "ft-l":
                _ft_l_edit(model, config, batch, preservation)
            else:
                _adapter_edit(model, config, batch, preservation, at_subject)
                if merged:  # the next group's adapters start from the edited weights
                    merge(model)
        if config.method != "ft-l" and not merged:
            changed = _weights_changed_by_adapters(model)
        else:
            changed = sum(int((w != o).sum()) for w, o in zip(weights, originals))
    seconds = time.perf_counter() - t0

    edit_m = metrics.token_matches(model, tokenizer, gen_prompts, target_ids)
    reph_m = _pair_matches(model, tokenizer, reph)
    port_m = _pair_matches(model, tokenizer, _answer_pairs(tokenizer, [x for e in edits for x in e.portability]))
    loc_m = metrics.token_matches(model, tokenizer, locality_prompts, before_locality)
    neighbor_m = _pair_matches(model, tokenizer, _answer_pairs(tokenizer, [x for e in edits for x in e.neighbors]))
    rephrased_m = _pair_matches(model, tokenizer, rephrased)
    generations = _texts(tokenizer, metrics.greedy_continuations(model, tokenizer, gen_prompts,
                                                                 config.generation_tokens))
    per_edit = [{"prompt": e.prompt, "target": e.target, "token_accuracy": sum(m) / len(m), "generation": g}
                for e, m, g in zip(edits, edit_m, generations)]
    fluency_rephrased = _fluency_after(model, tokenizer, reph_prompts, config.generation_tokens)
    result = EditMetrics(
        method=config.method, edits=len(edits), edit_success=metrics.accuracy(edit_m), edit_exact=metrics.exact(edit_m),
        generalization=metrics.accuracy(reph_m), locality=metrics.accuracy(loc_m),
        neighborhood=metrics.exact(neighbor_m), neighborhood_rephrased=metrics.exact(rephrased_m),
        portability=metrics.accuracy(port_m),
        fluency=metrics.fluency(generations), fluency_before=fluency_before,
        fluency_counterfactual=fluency_counterfactual, weights_changed=changed, seconds=seconds, per_edit=per_edit,
        fluency_rephrased=fluency_rephrased, fluency_rephrased_before=fluency_rephrased_before)
    return model, result


def mean_metrics(results: Sequence[EditMetrics]) -> EditMetrics:
    """Averages of several runs (e.g. single edits applied one at a time to fresh copies of the model)."""
    def avg(name):
        values = [getattr(r, name) for r in results if not math.isnan(getattr(r, name))]
        return statistics.mean(values) if values else math.nan

    return EditMetrics(
        method=results[0].method, edits=results[0].edits,
        **{k: avg(k) for k in ("edit_success", "edit_exact", "generalization", "locality", "portability", "fluency",
                               "fluency_before", "fluency_counterfactual", "neighborhood",
                               "neighborhood_rephrased", "fluency_rephrased", "fluency_rephrased_before",
                               "seconds")},
        weights_changed=round(statistics.mean(r.weights_changed for r in results)),
        per_edit=[p for r in results for p in r.per_edit])


def results_table(rows: Sequence[EditMetrics]) -> str:
    lines = ["| method | edits per run | edit success | exact | generalization | neighbourhood (strict) | "
             f"neighbourhood, rephrased | locality (agreement) | portability | {EditMetrics.FLUENCY_HEADER} | "
             "fluency after the rephrasings (before) | weights changed |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.method} | {r.edits} | {r.edit_success:.3f} | {r.edit_exact:.3f} | {r.generalization:.3f} | "
                     f"{r.neighborhood:.3f} | {r.neighborhood_rephrased:.3f} | {r.locality:.3f} | "
                     f"{r.portability:.3f} | {r.fluency_cell()} | {r.fluency_rephrased_cell()} | "
                     f"{r.weights_changed:,} |")
    return "\n".join(lines)
