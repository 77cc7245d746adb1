"""What an adaptation method is, as one record, and the registry of them.

A :class:`Method` holds everything that makes a method what it is: the shapes of its two factors and how they
start, the layer's forward, the dense update it adds to the base weight, how that update is folded into the weight
and back out, the extra state it carries, whether the merged weight keeps the base weight's zeros, whether PEFT's
LoRA computes the same function, which inits it allows and which config class describes it. ``SparseLoraLinear``,
inject / merge / save / load, the reports and the command line ask the record; none of them tests a method's name.
(PEFT's ``LoraVariant`` plays the same part there.)

Adding a method is one subclass and one :func:`register_method` call (see ``builtin_methods.py``).
"""

import math
from typing import TYPE_CHECKING, Dict, Iterable, Tuple

import torch
from torch import Tensor, nn

if TYPE_CHECKING:  # annotations only: the layer imports this module
    from .layer import SparseLoraLinear

INITS = ("zeros_B", "gaussian", "gradient_svd")


class Method:
    """The base record: plain LoRA's choices, which the other methods override where they differ."""

    name: str = ""
    help: str = ""
    #: the config dataclass that describes the method: SparseLoraConfig or a subclass of it with more fields
    config_class: type = None
    #: the merged weight keeps every zero of the base weight, exactly
    preserves_sparsity: bool = False
    #: PEFT's LoRA layer computes this method's function (B @ A added unmasked), so adapters export to PEFT
    exports_to_peft: bool = False
    #: the update is s · B @ A, so RoseLoRA's sparsity report (rows of A, columns of B, Proposition 1) applies
    lowrank_product: bool = True
    #: the inits it accepts, and the one its paper uses (the demo's choice)
    inits: Tuple[str, ...] = INITS
    inits_note: str = ""  # why, when some inits are refused
    preferred_init: str = "zeros_B"
    #: extra tensors (buffers) an adapter of this method carries, saved with it so that training can resume; a
    #: floating-point one stays float32 whatever dtype the model is moved to (keep_state_float32)
    state_names: Tuple[str, ...] = ()

    # ---------------------------------------------------------------------------------------------- shapes, init

    def factor_shapes(self, out_features: int, in_features: int, r: int) -> Tuple[Tuple[int, int], Tuple[int, int]]:
        """(lora_A shape, lora_B shape)."""
        return (r, in_features), (out_features, r)

    def check_layer(self, name: str, out_features: int, in_features: int, r: int) -> None:
        """Raise ValueError if a layer of this shape cannot take the method (checked before any layer changes)."""

    def init_state(self, layer: "SparseLoraLinear") -> None:
        """Register the method's extra buffers on a new layer (named in state_names)."""

    @torch.no_grad()
    def reset(self, layer: "SparseLoraLinear", init: str) -> None:
        """B to zero, so the layer starts as its base layer; A as `init` says (gradient_svd sets A later, from
        data: until then it is initialised as for zeros_B)."""
        if init == "gaussian":
            nn.init.normal_(layer.lora_A, std=1.0 / layer.r)
        else:
            nn.init.kaiming_uniform_(layer.lora_A, a=math.sqrt(5))
        nn.init.zeros_(layer.lora_B)

    # ------------------------------------------------------------------------------------------------- compute

    def forward(self, layer: "SparseLoraLinear", x: Tensor) -> Tensor:
        return layer.base_layer(x) + layer.scale * lora_branch(layer, x)

    def delta_weight(self, layer: "SparseLoraLinear") -> Tensor:
        """The dense (out, in) update the adapter adds to the base weight: what a merge folds in."""
        return layer.scale * (layer.lora_B @ layer.lora_A)

    def check_merge(self, layer: "SparseLoraLinear") -> None:
        """Raise ValueError if this layer's update cannot be folded into its weight and back out exactly (checked
        on every layer before any is merged)."""

    @torch.no_grad()
    def fold(self, layer: "SparseLoraLinear", sign: int) -> None:
        """Add (sign = +1: merge) or subtract (-1: unmerge) the update in place on the base weight."""
        layer.base_layer.weight.addmm_(layer.lora_B, layer.lora_A, alpha=sign * layer.scale)

    def __repr__(self) -> str:
        return f"<method {self.name}>"


def lora_branch(layer: "SparseLoraLinear", x: Tensor) -> Tensor:
    """(x Aᵀ) Bᵀ, with the adapter's dropout on x: the low-rank path of LoRA and the methods built on it."""
    return nn.functional.linear(nn.functional.linear(layer.dropout(x), layer.lora_A), layer.lora_B)


_REGISTRY: Dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Make `method` available by its name everywhere (configs, inject, save/load, the CLI's choices)."""
    if not method.name or not isinstance(method.name, str):
        raise ValueError("a method needs a name")
    if method.name in _REGISTRY:
        raise ValueError(f"a method named {method.name!r} is already registered")
    if method.preferred_init not in method.inits:
        raise ValueError(f"{method.name}: preferred_init {method.preferred_init!r} is not among its inits")
    if method.config_class is None:
        raise ValueError(f"{method.name}: set config_class (SparseLoraConfig, or a subclass with the method's fields)")
    _REGISTRY[method.name] = method
    return method


def get_method(name: str) -> Method:
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"method must be one of {method_names()}, got {name!r}") from None


def method_names() -> Tuple[str, ...]:
    return tuple(_REGISTRY)


def config_for(method: str, **fields) -> "object":
    """The config of `method` (its own config class) with `fields`: sa.config_for("roselora", r=8)."""
    return get_method(method).config_class(method=method, **fields)


def unregister_method(name: str) -> Method:
    """Remove a method registered earlier (the built-in ones too); returns its record."""
    return _REGISTRY.pop(get_method(name).name)


def keep_state_float32(module: nn.Module, names: Iterable[str]) -> None:
    """Convert the named floating-point buffers of `module` back to float32: ``model.to(dtype)``, ``.half()`` and
    ``.bfloat16()`` convert every floating-point buffer, but a method's state is accumulated in float32 (RoseLoRA's
    EMA scores, which ``ema_topk_`` refuses in any other dtype). Called after ``nn.Module._apply``."""
    for name in names:
        buf = module._buffers.get(name)
        if buf is not None and buf.is_floating_point() and buf.dtype != torch.float32:
            module._buffers[name] = buf.float()
