"""sparse_adapt: sparse low-rank adaptation for PyTorch (LoRS, RoseLoRA and their baselines)."""

from . import data, edit, models, ops, prune, reference
from ._native import has_cuda_kernels
from .adapters import (METHODS, RoseLoraConfig, SparseLoraConfig, SparseLoraLinear, TrainableParameters,
                       adapter_layers, export_peft, inject, load_adapter, merge, save_adapter, trainable_parameters,
                       unload, unmerge)
from .ops import ema_topk_, ema_topk_multi_, masked_lora_linear, masked_merge, masked_merge_
from .training import RoseLoraPruner, gradient_svd_init_, sparsity_report

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "RoseLoraPruner",
    "RoseLoraConfig",
    "SparseLoraConfig",
    "SparseLoraLinear",
    "TrainableParameters",
    "adapter_layers",
    "ema_topk_",
    "ema_topk_multi_",
    "export_peft",
    "gradient_svd_init_",
    "inject",
    "load_adapter",
    "merge",
    "save_adapter",
    "sparsity_report",
    "trainable_parameters",
    "unload",
    "unmerge",
    "has_cuda_kernels",
    "masked_lora_linear",
    "masked_merge",
    "masked_merge_",
    "data",
    "edit",
    "models",
    "ops",
    "prune",
    "reference",
]
