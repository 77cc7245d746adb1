"""Model-level API: inject adapters into any nn.Module (Hugging Face models included), count, merge, unload."""

import contextlib
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from ..distributed import unwrap
from .config import SparseLoraConfig
from .gradient_svd import gradient_svd_init_
from .layer import SparseLoraLinear, adapter_layers
from .method import get_method


def _output_embedding(model: nn.Module) -> Optional[nn.Module]:
    get = getattr(model, "get_output_embeddings", None)
    try:
        return get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        return None


def matches_targets(name: str, target_modules) -> bool:
    """Does the qualified module name match target_modules: a regex (whole name) or a list of names, each equal to
    it or a dotted suffix of it."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def _read_by_parent(model: nn.Module) -> Dict[str, str]:
    """Linear modules whose parent reads their weight directly instead of calling them, which an adapter cannot
    intercept: {name: why}. nn.MultiheadAttention passes out_proj.weight to its functional form."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            found[f"{name}.out_proj" if name else "out_proj"] = (
                "nn.MultiheadAttention reads out_proj.weight directly and never calls out_proj")
    return found


def find_targets(model: nn.Module, target_modules) -> List[str]:
    """Qualified names of the nn.Linear modules that target_modules selects (see SparseLoraConfig). 'all-linear'
    leaves out the output embedding and linears an adapter cannot wrap (nn.MultiheadAttention's out_proj); naming
    one of those explicitly is refused."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n]
    unwrappable = _read_by_parent(model)
    if target_modules == "all-linear":
        head = _output_embedding(model)
        return [n for n, m in linears if m is not head and n not in unwrappable]
    names = [n for n, _ in linears if matches_targets(n, target_modules)]
    refused = [n for n in names if n in unwrappable]
    if refused:
        raise ValueError(f"cannot adapt {refused[:3]}: {unwrappable[refused[0]]}")
    return names


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def inject(model: nn.Module, config: SparseLoraConfig, calibration_batches=None, loss_fn=None) -> nn.Module:
    """Replace the targeted nn.Linear modules with SparseLoraLinear adapters, freeze everything else, and
    return the model (changed in place).

    With ``config.init == "gradient_svd"``, ``calibration_batches`` (and optionally ``loss_fn(model, batch)``,
    default ``model(**batch).loss``) are used to set each ``lora_A`` from its weight's gradient.
    """
    model = unwrap(model)
    if any(True for _ in adapter_layers(model)):
        raise ValueError("model already has sparse_adapt adapters; call sa.unload(model) or sa.merge(model) first")
    targets = find_targets(model, config.target_modules)
    if not targets:
        linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:8]
        raise ValueError(f"target_modules={config.target_modules!r} matches no nn.Linear in "
                         f"{type(model).__name__}; some of its linear layers: {linear_names}")
    if config.init == "gradient_svd" and calibration_batches is None:
        raise ValueError("init='gradient_svd' needs calibration_batches: "
                         "sa.inject(model, config, calibration_batches=...)")
    record = get_method(config.method)
    for name in targets:  # every layer is checked before any is replaced
        weight = model.get_submodule(name).weight
        record.check_layer(name, weight.shape[0], weight.shape[1], config.r)
    with restored_on_failure(model):
        for p in model.parameters():
            p.requires_grad_(False)
        for name in targets:
            _set_submodule(model, name, SparseLoraLinear(model.get_submodule(name), config, name))
        if config.init == "gradient_svd":
            gradient_svd_init_(model, calibration_batches, loss_fn)
    return model


@contextlib.contextmanager
def restored_on_failure(model: nn.Module, values: Sequence[torch.Tensor] = ()):
    """If the block raises, put back what inject (and load_adapter) changes -- every module it replaced, every
    parameter's requires_grad and .grad, every buffer's value -- and the values of ``values`` (tensors the block
    may change in place, e.g. weights that a merge writes), and re-raise: a failed call leaves the model as it was.
    Yields the copies of ``values`` taken on entry."""
    modules = dict(model.named_modules())
    requires_grad = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]  # a calibration forward may update some
    kept = [(t, t.detach().clone()) for t in values]
    try:
        yield [copy for _, copy in kept]
    except BaseException:
        with torch.no_grad():
            for name, layer in list(adapter_layers(model)):
                if modules.get(name) is not layer:  # one this call put in
                    _set_submodule(model, name, layer.base_layer)
            for p, flag, grad in requires_grad:
                p.requires_grad_(flag)
                p.grad = grad
            for t, value in (*buffers, *kept):
                t.copy_(value)
        raise


def adapter_config(model: nn.Module) -> SparseLoraConfig:
    layers = list(adapter_layers(model))
    if not layers:
        raise ValueError(f"{type(model).__name__} has no sparse_adapt adapters (use sa.inject first)")
    return layers[0][1].config


def _untie(model: nn.Module, layer: SparseLoraLinear, owners: Dict[int, set]) -> None:
    """Give the layer's base weight its own storage if another module shares it (a tied lm_head shares the input
    embedding), so that merging the adapter changes this layer only: merged == adapted. ``owners``: the ids of
    the modules holding each parameter, by the parameter's id."""
    weight = layer.base_layer.weight
    if owners.get(id(weight), set()) - {id(layer.base_layer)}:
        layer.base_layer.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
        config = getattr(model, "config", None)
        if getattr(config, "tie_word_embeddings", False):
            config.tie_word_embeddings = False  # so that save_pretrained keeps the merged head as it is


@torch.no_grad()
def merge(model: nn.Module, unload: bool = True) -> nn.Module:
    """Fold every adapter into its base weight. For sqft, sqft_gc, spp, spp_gc and lors the zeros of each merged
    weight are exactly the base weight's. ``unload=True``: the adapters are replaced by their (now merged) plain
    nn.Linear modules; ``unload=False``: they stay, merged, so that ``sa.unmerge`` can undo it.

    Every adapter is checked before any is merged (a refusal changes nothing). A targeted weight that another
    module shares (a tied lm_head) is untied first, so the merged model computes what the adapted one did."""
    model = unwrap(model)
    layers = list(adapter_layers(model))
    pending = [layer for _, layer in layers if not layer.merged]
    for layer in pending:
        layer.record.check_merge(layer)
    owners: Dict[int, set] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            owners.setdefault(id(p), set()).add(id(m))
    for layer in pending:
        _untie(model, layer, owners)
        layer.merge(check=False)  # checked above
    if unload:
        for name, layer in layers:
            _set_submodule(model, name, layer.base_layer)
    return model


@torch.no_grad()
def unmerge(model: nn.Module) -> nn.Module:
    """Undo ``sa.merge(model, unload=False)``."""
    layers = [layer for _, layer in adapter_layers(model) if layer.merged]
    if not layers:
        raise ValueError("no merged adapters to unmerge (sa.merge(model) with unload=True cannot be undone)")
    for layer in layers:
        layer.unmerge()
    return model


def unload(model: nn.Module) -> nn.Module:
    """Remove the adapters without merging them: the base nn.Linear modules come back unchanged."""
    model = unwrap(model)
    for name, layer in list(adapter_layers(model)):
        if layer.merged:
            layer.unmerge()
        _set_submodule(model, name, layer.base_layer)
    return model


@dataclass
class TrainableParameters:
    trainable: int
    total: int
    effective: int  # non-zero adapter entries: what RoseLoRA reports as its parameter count
    adapted_layers: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return (f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: "
                f"{self.percent:.4f} || effective (non-zero) adapter params: {self.effective:,} || "
                f"adapted layers: {self.adapted_layers}")


@torch.no_grad()
def trainable_parameters(model: nn.Module) -> TrainableParameters:
    """Counts; ``effective`` counts the non-zero entries of the adapters (RoseLoRA's "low-rank parameters ×
    (1 − sparsity)"; for the other methods it equals the adapter size once B is non-zero)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    layers = [layer for _, layer in adapter_layers(model)]
    effective = sum(int(torch.count_nonzero(layer.lora_A)) + int(torch.count_nonzero(layer.lora_B)) for layer in layers)
    return TrainableParameters(trainable, total, effective, len(layers))
