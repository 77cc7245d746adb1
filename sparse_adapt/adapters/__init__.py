"""The adapter layer, its configs, and the model-level API (inject / merge / save / load)."""

from .config import METHODS, SPARSITY_PRESERVING, RoseLoraConfig, SparseLoraConfig
from .io import export_peft, load_adapter, save_adapter
from .layer import SparseLoraLinear
from .model import (TrainableParameters, adapter_layers, find_targets, inject, merge, trainable_parameters, unload,
                    unmerge)

__all__ = [
    "METHODS", "SPARSITY_PRESERVING", "RoseLoraConfig", "SparseLoraConfig", "SparseLoraLinear", "TrainableParameters",
    "adapter_layers", "export_peft", "find_targets", "inject", "load_adapter", "merge", "save_adapter",
    "trainable_parameters", "unload", "unmerge",
]
