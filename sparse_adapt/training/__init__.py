"""Training utilities above the adapters: RoseLoRA's pruner and schedule, the sparsity report. (LoRS's
gradient-SVD init is an adapter init, sparse_adapt.adapters.gradient_svd; re-exported here.)"""

from ..adapters.gradient_svd import gradient_svd_init_
from .report import SparsityReport, proposition1_bound, sparsity_report
from .roselora import RoseLoraPruner, kept_count, kept_fraction, pruner_for

__all__ = ["RoseLoraPruner", "SparsityReport", "gradient_svd_init_", "kept_count", "kept_fraction",
           "proposition1_bound", "pruner_for", "sparsity_report"]
