"""Training utilities: LoRS's gradient-SVD init, RoseLoRA's pruner and schedule, the sparsity report."""

from .init import gradient_svd_init_
from .pruner import RoseLoraPruner, kept_count, kept_fraction
from .report import SparsityReport, proposition1_bound, sparsity_report

__all__ = ["RoseLoraPruner", "SparsityReport", "gradient_svd_init_", "kept_count", "kept_fraction",
           "proposition1_bound", "sparsity_report"]
