"""Loads the compiled library, which registers ``torch.ops.sparse_adapt.*`` for every backend it was built with."""

import torch

try:
    from . import _C  # noqa: F401  (its import runs the TORCH_LIBRARY registrations)
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "sparse_adapt's native library (sparse_adapt._C) is not built. From the repository root run "
        "`make build`, or `pip install --no-build-isolation -e .` in an environment that has torch."
    ) from exc


def has_cuda_kernels() -> bool:
    """Whether this build of sparse_adapt has its CUDA kernels (independent of whether a GPU is present)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("sparse_adapt::masked_merge", "CUDA")
