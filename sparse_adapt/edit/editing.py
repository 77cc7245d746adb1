"""apply_edits: write new facts into a causal LM with RoseLoRA (or the LoRA / FT-L baselines) and measure them."""

import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..adapters import RoseLoraConfig, adapter_layers, config_for, get_method, inject, merge
from ..adapters.model import restored_on_failure
from ..progress import progress_bar
from ..training import pruner_for
from . import metrics

EDIT_METHODS = ("roselora", "lora", "ft-l")


@dataclass
class Edit:
    """A new fact: after ``prompt`` the model should say ``target``. ``rephrasings`` test generalization,
    ``portability`` holds (related prompt, expected answer) pairs. A target without a leading space gets one, so
    that it continues the prompt as a new word."""

    prompt: str
    target: str
    rephrasings: Sequence[str] = ()
    portability: Sequence[Tuple[str, str]] = ()

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
        pairs = []
        for p in ([] if isinstance(self.portability, str) else self.portability):
            pair = tuple(p) if isinstance(p, (list, tuple)) else ()
            if len(pair) != 2 or not all(isinstance(x, str) and x.strip() for x in pair):
                raise ValueError(f"portability of {self.prompt!r} must be a list of (prompt, answer) pairs of "
                                 f"non-empty strings (or {{'prompt', 'answer'}} objects), got {p!r}")
            pairs.append(pair)
        if isinstance(self.portability, str):
            raise ValueError(f"portability of {self.prompt!r} must be a list of (prompt, answer) pairs, "
                             f"got {self.portability!r}")
        self.portability = pairs

    @staticmethod
    def from_dict(d: Dict) -> "Edit":
        if not isinstance(d, dict):
            raise ValueError(f"an edit must be a JSON object, got {type(d).__name__}")
        portability = d.get("portability", ())
        if isinstance(portability, list):
            portability = [(p.get("prompt"), p.get("answer")) if isinstance(p, dict) else p for p in portability]
        return Edit(d.get("prompt", ""), d.get("target", ""), d.get("rephrasings", ()), portability)


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
    generation_tokens: int = 32  # for fluency
    locality_tokens: int = 3
    seed: int = 0

    def __post_init__(self):
        if self.method not in EDIT_METHODS:
            raise ValueError(f"method must be one of {EDIT_METHODS}, got {self.method!r}")
        if self.steps < 1 or not self.lr > 0:
            raise ValueError("steps must be >= 1 and lr > 0")


@dataclass
class EditMetrics:
    method: str
    edits: int
    edit_success: float  # token accuracy of the new targets
    edit_exact: float  # fraction of prompts whose whole target is the greedy continuation
    generalization: float
    locality: float
    portability: float
    fluency: float
    fluency_before: float
    weights_changed: int
    seconds: float = math.nan
    per_edit: List[Dict] = field(default_factory=list)

    def as_row(self) -> Dict:
        d = asdict(self)
        d.pop("per_edit")
        return d


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


def _edit_batch(tokenizer, edits, target_ids, device):
    seqs, labels = [], []
    for e, t in zip(edits, target_ids):
        p = metrics.encode(tokenizer, e.prompt, True)
        seqs.append(p + t)
        labels.append([-100] * len(p) + t)
    ids, mask = metrics.pad_batch(seqs, tokenizer.pad_token_id or 0)
    lab, _ = metrics.pad_batch(labels, -100)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": lab.to(device)}


def _train(model, params, batch, steps, lr, after_step=None, desc="editing"):
    opt = torch.optim.Adam(params, lr=lr)
    model.train()
    for _ in progress_bar(range(steps), desc):
        opt.zero_grad()
        model(**batch, use_cache=False).loss.backward()
        opt.step()
        if after_step is not None:
            after_step()
    model.eval()


def _adapter_edit(model, config, batch) -> None:
    fields = dict(r=config.r, alpha=config.alpha, target_modules=list(config.target_modules))
    if issubclass(get_method(config.method).config_class, RoseLoraConfig):  # the pruning schedule of an edit
        fields.update(sparsity=config.sparsity, beta=0.8, t_init=0, t_final=max(1, int(config.steps * 0.6)))
    adapter = config_for(config.method, **fields)
    inject(model, adapter)
    params = [p for p in model.parameters() if p.requires_grad]
    pruner = pruner_for(model, total_steps=config.steps)
    _train(model, params, batch, config.steps, config.lr, pruner.step if pruner else None, f"{config.method} edit")


def _ft_l_edit(model, config, batch) -> Tuple[torch.Tensor, torch.Tensor]:
    """FT-L (ROME's baseline): fine-tune one MLP weight directly, each entry kept within ±ft_max_change."""
    for p in model.parameters():
        p.requires_grad_(False)
    weight = model.get_submodule(config.ft_module).weight
    original = weight.detach().clone()
    weight.requires_grad_(True)

    def constrain():
        with torch.no_grad():
            weight.copy_(original + (weight - original).clamp_(-config.ft_max_change, config.ft_max_change))

    try:
        _train(model, [weight], batch, config.steps, config.lr, constrain, "ft-l edit")
    except BaseException:
        with torch.no_grad():
            weight.copy_(original)  # a failed edit leaves the weight as it was
        raise
    weight.requires_grad_(False)
    return weight, original


def _weights_changed_by_adapters(model) -> int:
    with torch.no_grad():
        return sum(metrics.nonzero_count(layer.get_delta_weight()) for _, layer in adapter_layers(model))


def _texts(tokenizer, token_lists) -> List[str]:
    return [tokenizer.decode(t, skip_special_tokens=True) for t in token_lists]


def apply_edits(model: nn.Module, tokenizer, edits: Sequence[Edit], config: Optional[EditConfig] = None,
                locality_prompts: Sequence[str] = ()) -> Tuple[nn.Module, EditMetrics]:
    """Apply all ``edits`` at once (one batch) and measure them. Returns the edited model -- with the adapters
    attached, or merged if ``config.merge`` -- and its :class:`EditMetrics`. ``locality_prompts`` are prompts
    unrelated to the edits whose continuations should not change."""
    config = config or EditConfig()
    edits = [e if isinstance(e, Edit) else Edit.from_dict(e) for e in edits]
    target_ids = _validate(edits, tokenizer)
    torch.manual_seed(config.seed)
    device = next(model.parameters()).device
    model.eval()
    before_locality = metrics.greedy_continuations(model, tokenizer, locality_prompts, config.locality_tokens)
    gen_prompts = [e.prompt for e in edits]
    fluency_before = metrics.fluency(_texts(tokenizer, metrics.greedy_continuations(
        model, tokenizer, gen_prompts, config.generation_tokens)))

    batch = _edit_batch(tokenizer, edits, target_ids, device)
    t0 = time.perf_counter()
    # A failure while editing (a bad loss, an interrupt) leaves the model as it came: no adapters, flags, weights.
    with restored_on_failure(model):
        if config.method == "ft-l":
            weight, original = _ft_l_edit(model, config, batch)
            changed = int((weight != original).sum())
        else:
            _adapter_edit(model, config, batch)
            changed = _weights_changed_by_adapters(model)
            if config.merge:
                merge(model)
    seconds = time.perf_counter() - t0

    edit_m = metrics.token_matches(model, tokenizer, gen_prompts, target_ids)
    reph = [(r, t) for e, t in zip(edits, target_ids) for r in e.rephrasings]
    reph_m = metrics.token_matches(model, tokenizer, [r for r, _ in reph], [t for _, t in reph])
    port = [(p, metrics.encode(tokenizer, a if a.startswith(" ") else " " + a, False)) for e in edits
            for p, a in e.portability]
    port_m = metrics.token_matches(model, tokenizer, [p for p, _ in port], [a for _, a in port])
    loc_m = metrics.token_matches(model, tokenizer, locality_prompts, before_locality)
    generations = _texts(tokenizer, metrics.greedy_continuations(model, tokenizer, gen_prompts,
                                                                 config.generation_tokens))
    per_edit = [{"prompt": e.prompt, "target": e.target, "token_accuracy": sum(m) / len(m), "generation": g}
                for e, m, g in zip(edits, edit_m, generations)]
    result = EditMetrics(
        method=config.method, edits=len(edits), edit_success=metrics.accuracy(edit_m), edit_exact=metrics.exact(edit_m),
        generalization=metrics.accuracy(reph_m), locality=metrics.accuracy(loc_m),
        portability=metrics.accuracy(port_m), fluency=metrics.fluency(generations), fluency_before=fluency_before,
        weights_changed=changed, seconds=seconds, per_edit=per_edit)
    return model, result


def mean_metrics(results: Sequence[EditMetrics]) -> EditMetrics:
    """Averages of several runs (e.g. single edits applied one at a time to fresh copies of the model)."""
    def avg(name):
        values = [getattr(r, name) for r in results if not math.isnan(getattr(r, name))]
        return statistics.mean(values) if values else math.nan

    return EditMetrics(
        method=results[0].method, edits=results[0].edits,
        **{k: avg(k) for k in ("edit_success", "edit_exact", "generalization", "locality", "portability", "fluency",
                               "fluency_before", "seconds")},
        weights_changed=round(statistics.mean(r.weights_changed for r in results)),
        per_edit=[p for r in results for p in r.per_edit])


def results_table(rows: Sequence[EditMetrics]) -> str:
    lines = ["| method | edits per run | edit success | exact | generalization | locality | portability | fluency "
             "(before) | weights changed |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.method} | {r.edits} | {r.edit_success:.3f} | {r.edit_exact:.3f} | {r.generalization:.3f} | "
                     f"{r.locality:.3f} | {r.portability:.3f} | {r.fluency:.2f} ({r.fluency_before:.2f}) | "
                     f"{r.weights_changed:,} |")
    return "\n".join(lines)
