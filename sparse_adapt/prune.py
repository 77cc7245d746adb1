"""Pruning, to make the sparse models that LoRS fine-tunes: magnitude and Wanda, unstructured per output row
or N:M (e.g. 2:4) within each group of M consecutive inputs.

Wanda's score is |W_ij| · ‖X_j‖₂, with ‖X_j‖₂ the norm of input feature j over the calibration tokens, compared
within each output row (as in the Wanda paper) or within each group of M. The norms are gathered by forward
hooks that keep one running vector of size ``in`` per layer -- no activation is stored -- in one pass of the
calibration batches through the dense model (Wanda's own code prunes block by block, feeding each block's
pruned output to the next; that needs the model's block structure, this works on any model).
"""

import re
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .adapters.model import find_targets
from .progress import progress_bar

Sparsity = Union[float, str]


def parse_sparsity(sparsity: Sparsity) -> Tuple[str, float, int, int]:
    """('unstructured', fraction, 0, 0) or ('n:m', n / m, n, m) for the kept n of every m."""
    if isinstance(sparsity, str):
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", sparsity)
        if not match or not 0 < int(match[1]) < int(match[2]):
            raise ValueError(f"sparsity must be a fraction in [0, 1) or 'N:M' with 0 < N < M, got {sparsity!r}")
        n, m = int(match[1]), int(match[2])
        return "n:m", 1 - n / m, n, m
    if not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"sparsity must be a fraction in [0, 1) or 'N:M', got {sparsity!r}")
    return "unstructured", float(sparsity), 0, 0


def keep_mask(score: Tensor, sparsity: Sparsity) -> Tensor:
    """Bool mask of the entries to keep: per output row the (1 − sparsity) largest scores, or per group of M
    consecutive inputs the N largest."""
    kind, fraction, n, m = parse_sparsity(sparsity)
    out, in_ = score.shape
    keep = torch.ones_like(score, dtype=torch.bool)
    if kind == "n:m":
        if in_ % m:
            raise ValueError(f"{n}:{m} sparsity needs in_features divisible by {m}, got {in_}")
        groups = score.reshape(out, in_ // m, m)
        drop = groups.topk(m - n, dim=-1, largest=False).indices
        return keep.reshape(out, in_ // m, m).scatter_(-1, drop, False).reshape(out, in_)
    k = round(fraction * in_)
    if k:
        keep.scatter_(1, score.topk(k, dim=1, largest=False).indices, False)
    return keep


@dataclass
class PruneReport:
    sparsity: Dict[str, float]  # achieved fraction of zeros per pruned layer
    target: Sparsity

    @property
    def overall(self) -> float:
        return sum(self.sparsity.values()) / max(len(self.sparsity), 1)

    def summary(self) -> str:
        values = list(self.sparsity.values())
        return (f"pruned {len(values)} layers to {self.target!r}: achieved sparsity min {min(values):.4f}, "
                f"mean {self.overall:.4f}, max {max(values):.4f}")

    def to_markdown(self) -> str:
        return "\n".join(["| layer | sparsity |", "|---|---:|"] +
                         [f"| {n} | {s:.4f} |" for n, s in self.sparsity.items()])


def _check_prunable(model: nn.Module, names: List[str], sparsity: Sparsity, target_modules) -> None:
    """Everything that could make pruning fail, for every layer, before any weight changes."""
    kind, _, n, m = parse_sparsity(sparsity)
    if not names:
        raise ValueError(f"target_modules={target_modules!r} matches no nn.Linear")
    if kind == "n:m":
        bad = [(name, model.get_submodule(name).in_features) for name in names
               if model.get_submodule(name).in_features % m]
        if bad:
            raise ValueError(f"{n}:{m} sparsity needs in_features divisible by {m}; these layers are not: "
                             f"{', '.join(f'{name} (in_features={i})' for name, i in bad[:5])}")


@torch.no_grad()
def _apply(model: nn.Module, names: List[str], score_fn: Callable[[str, nn.Linear], Tensor], sparsity: Sparsity,
           progress: bool) -> PruneReport:
    # Every layer's mask is computed once before any weight changes, so that a layer that cannot be scored fails
    # the call with nothing pruned; then computed again (the same, deterministically) and applied. Keeping all the
    # masks instead would hold a byte per weight of the whole model.
    for name in names:
        keep_mask(score_fn(name, model.get_submodule(name)), sparsity)
    achieved = {}
    for name in progress_bar(names, "pruning", enabled=progress):
        layer = model.get_submodule(name)
        layer.weight.mul_(keep_mask(score_fn(name, layer), sparsity).to(layer.weight.device))
        achieved[name] = float((layer.weight == 0).float().mean())
    return PruneReport(achieved, sparsity)


def magnitude_(model: nn.Module, sparsity: Sparsity, target_modules="all-linear", progress: bool = True) -> PruneReport:
    """Zero the smallest-magnitude weights of every targeted nn.Linear, in place."""
    names = find_targets(model, target_modules)
    _check_prunable(model, names, sparsity, target_modules)
    return _apply(model, names, lambda _, layer: layer.weight.detach().abs().float(), sparsity, progress)


def _default_forward(model: nn.Module, batch) -> None:
    model(**batch) if isinstance(batch, dict) else model(batch)


@torch.no_grad()
def wanda_(model: nn.Module, calibration_batches: Iterable, sparsity: Sparsity, target_modules="all-linear",
           forward_fn: Optional[Callable] = None, progress: bool = True) -> PruneReport:
    """Wanda: zero the weights of smallest |W_ij| · ‖X_j‖₂ in every targeted nn.Linear, in place."""
    names = find_targets(model, target_modules)
    _check_prunable(model, names, sparsity, target_modules)
    sq_norms: Dict[str, Tensor] = {}

    def hook(name):
        def accumulate(module, args, output):
            x = args[0].detach().reshape(-1, module.in_features).float()
            sq_norms[name] = sq_norms.get(name, 0) + x.square().sum(0)
        return accumulate

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    forward_fn = forward_fn or _default_forward
    try:
        batches = list(calibration_batches)
        if not batches:
            raise ValueError("calibration_batches is empty")
        for batch in progress_bar(batches, "wanda calibration", enabled=progress):
            forward_fn(model, batch)
    finally:
        for h in handles:
            h.remove()
    unseen = [n for n in names if n not in sq_norms]
    if unseen:
        raise RuntimeError(f"the calibration batches never reached {unseen[:5]}")

    def score(name, layer):
        return layer.weight.detach().abs().float() * sq_norms[name].sqrt().to(layer.weight.device)

    return _apply(model, names, score, sparsity, progress)
