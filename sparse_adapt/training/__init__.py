"""Training utilities: initialisation (and, with RoseLoRA, the pruning schedule)."""

from .init import gradient_svd_init_

__all__ = ["gradient_svd_init_"]
