"""sparse_adapt: sparse low-rank adaptation for PyTorch (LoRS, RoseLoRA and their baselines)."""

from . import ops, reference
from ._native import has_cuda_kernels
from .ops import ema_topk_, masked_lora_linear, masked_merge, masked_merge_

__version__ = "0.1.0"

__all__ = [
    "ema_topk_",
    "has_cuda_kernels",
    "masked_lora_linear",
    "masked_merge",
    "masked_merge_",
    "ops",
    "reference",
]
