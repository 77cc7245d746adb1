"""sparse_adapt: sparse low-rank adaptation for PyTorch (LoRS, RoseLoRA and their baselines).

The library: the native ops (``sa.masked_merge`` ...), the adapters (``sa.inject``, ``sa.SparseLoraConfig``, one
record per method), training utilities (``sa.RoseLoraPruner``, ``sa.sparsity_report``) and pruning (``sa.prune``).
The applications built on it -- knowledge editing (``sa.edit``), the demo (``sparse_adapt.demo``), the real model
and text they use (``sparse_adapt.assets``) -- load on first use, not on ``import sparse_adapt``.
"""

import importlib

from . import ops, prune, reference
from ._native import has_cuda_kernels
from .adapters import (
    METHODS,
    Method,
    RoseLoraConfig,
    SparseLoraConfig,
    SparseLoraLinear,
    TrainableParameters,
    adapter_layers,
    adapter_sites,
    config_for,
    export_peft,
    get_method,
    gradient_svd_init_,
    inject,
    load_adapter,
    merge,
    method_names,
    register_method,
    save_adapter,
    trainable_parameters,
    unload,
    unmerge,
)
from .ops import ema_topk_, ema_topk_multi_, masked_lora_linear, masked_merge, masked_merge_
from .training import RoseLoraPruner, sparsity_report

__version__ = "0.1.0"

# Applications, assets and the PEFT bridge, imported when first used: sa.edit, sa.demo, sa.assets (sa.models and
# sa.data are the assets' model and text modules, under the names earlier versions gave them), sa.peft (needs peft).
_LAZY = {"edit": ".edit", "demo": ".demo", "assets": ".assets", "lm": ".lm", "models": ".assets.models",
         "data": ".assets.text", "peft": ".peft"}


def __getattr__(name):
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name], __name__)
        globals()[name] = module
        return module
    raise AttributeError(f"module 'sparse_adapt' has no attribute {name!r}")


__all__ = [
    "METHODS",
    "Method",
    "RoseLoraConfig",
    "RoseLoraPruner",
    "SparseLoraConfig",
    "SparseLoraLinear",
    "TrainableParameters",
    "adapter_layers",
    "adapter_sites",
    "config_for",
    "ema_topk_",
    "ema_topk_multi_",
    "export_peft",
    "get_method",
    "gradient_svd_init_",
    "has_cuda_kernels",
    "inject",
    "load_adapter",
    "masked_lora_linear",
    "masked_merge",
    "masked_merge_",
    "merge",
    "method_names",
    "ops",
    "prune",
    "reference",
    "register_method",
    "save_adapter",
    "sparsity_report",
    "trainable_parameters",
    "unload",
    "unmerge",
]
