"""SparseLoraLinear: one adapter module for every method, wrapping an existing nn.Linear; the method's record
(method.py) decides its factors' shapes, its forward, its update and how the update is merged."""

from typing import Iterator, Tuple

import torch
from torch import Tensor, nn

from ..distributed import unwrap
from .config import SparseLoraConfig
from .method import Method, get_method, keep_state_float32


class SparseLoraLinear(nn.Module):
    """A frozen ``nn.Linear`` plus a low-rank adapter whose method (``config.method``) picks forward and merge.

    ``lora_A`` and ``lora_B`` have the shapes the method gives them -- ``(r, in)`` and ``(out, r)``, except SPP,
    whose ``lora_B`` is its column ``b`` of shape ``(out, 1)`` -- and the base weight's dtype and device. A method
    with extra state (RoseLoRA: ``rose_score_A``, ``rose_score_B``, ``rose_step``) registers it as buffers.
    """

    def __init__(self, base_layer: nn.Linear, config: SparseLoraConfig, name: str = "layer"):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"SparseLoraLinear wraps an nn.Linear, got {type(base_layer).__name__}")
        record = get_method(config.method)
        out_features, in_features = base_layer.weight.shape
        record.check_layer(name, out_features, in_features, config.r)
        self.base_layer = base_layer
        self.config = config
        self.method = config.method
        self.r = config.r
        self.scale = config.scale
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.merged = False
        self.name = name
        factory = dict(device=base_layer.weight.device, dtype=base_layer.weight.dtype)
        shape_A, shape_B = record.factor_shapes(out_features, in_features, config.r)
        self.lora_A = nn.Parameter(torch.empty(shape_A, **factory))
        self.lora_B = nn.Parameter(torch.zeros(shape_B, **factory))
        record.init_state(self)
        self.reset_adapter(config.init)

    @property
    def record(self) -> Method:
        return get_method(self.method)

    @property
    def exact_grad(self) -> bool:
        return self.config.exact_grad

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def reset_adapter(self, init: str = "zeros_B") -> None:
        """B to zero, so the layer starts as the base layer; A as `init` says (gradient_svd sets A later, from data;
        until then A is initialised as for zeros_B)."""
        self.record.reset(self, init)

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self.base_layer(x)
        return self.record.forward(self, x)

    def _apply(self, fn, recurse=True):
        # model.to / .half() / .bfloat16() move the method's state with the model but leave it float32
        super()._apply(fn, recurse)
        keep_state_float32(self, self.record.state_names)
        return self

    def get_delta_weight(self) -> Tensor:
        """The dense (out, in) update this adapter adds to the base weight (what merge folds in)."""
        return self.record.delta_weight(self)

    @torch.no_grad()
    def merge(self, check: bool = True) -> None:
        """Fold the adapter into the base weight; for the sparsity-preserving methods the zeros stay exactly.
        ``check=False`` skips the method's merge check, for a caller that has already run it."""
        if self.merged:
            raise RuntimeError("adapter is already merged")
        if check:
            self.record.check_merge(self)
        self.record.fold(self, +1)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise RuntimeError("adapter is not merged")
        self.record.fold(self, -1)
        self.merged = False

    def extra_repr(self) -> str:
        return f"method={self.method}, r={self.r}, scale={self.scale:g}, merged={self.merged}"


def adapter_sites(model: nn.Module) -> Iterator[Tuple[str, object]]:
    """(qualified name, adapter) of every adapter the training tools work on (``RoseLoraPruner``,
    ``sparsity_report``, ``gradient_svd_init_``): each SparseLoraLinear, and each active adapter of a module that
    lists its own through a ``sparse_adapt_sites()`` method (the PEFT layers of ``sparse_adapt.peft``). An adapter
    has what a method record reads: ``base_layer``, ``lora_A``, ``lora_B``, ``scale``, ``dropout``, ``config``,
    ``r``, ``in_features``, ``out_features``, ``record``, its method's state, and ``register_forward_hook``."""
    for name, module in unwrap(model).named_modules():
        if isinstance(module, SparseLoraLinear):
            yield name, module
            continue
        sites = getattr(module, "sparse_adapt_sites", None)
        if callable(sites):
            for site in sites():
                yield name, site


def adapter_layers(model: nn.Module) -> Iterator[Tuple[str, SparseLoraLinear]]:
    """(qualified name, layer) of every adapter in the model, in module order; names are those of the model
    inside any DDP / torch.compile wrapper, so they match a single process's."""
    for name, module in unwrap(model).named_modules():
        if isinstance(module, SparseLoraLinear):
            yield name, module
