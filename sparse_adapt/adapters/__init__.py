"""The adapter layer, its configs, one record per method, and the model-level API (inject / merge / save / load).

Layers point one way: method records and configs <- the layer <- inject / merge / save / load (and the
gradient-SVD init, which inject uses). Nothing here imports sparse_adapt.training or the applications.
"""

from . import builtin_methods  # noqa: F401  (registers lora, sqft, sqft_gc, spp, spp_gc, lors, roselora)
from .config import RoseLoraConfig, SparseLoraConfig
from .gradient_svd import gradient_svd_init_
from .io import export_peft, load_adapter, save_adapter
from .layer import SparseLoraLinear, adapter_layers, adapter_sites
from .method import INITS, Method, config_for, get_method, method_names, register_method, unregister_method
from .model import TrainableParameters, find_targets, inject, merge, trainable_parameters, unload, unmerge

# The built-in methods' names, in registration order (sa.method_names() also lists methods registered later).
METHODS = method_names()
SPARSITY_PRESERVING = frozenset(m for m in METHODS if get_method(m).preserves_sparsity)

__all__ = [
    "INITS", "METHODS", "Method", "RoseLoraConfig", "SPARSITY_PRESERVING", "SparseLoraConfig", "SparseLoraLinear",
    "TrainableParameters", "adapter_layers", "adapter_sites", "config_for", "export_peft", "find_targets", "get_method",
    "gradient_svd_init_", "inject", "load_adapter", "merge", "method_names", "register_method", "save_adapter",
    "unregister_method",
    "trainable_parameters", "unload", "unmerge",
]
