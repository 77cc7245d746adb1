"""What was built: the CPU kernels always, the CUDA kernels whenever the build was asked to have them."""

import os

import pytest
import torch

import sparse_adapt as sa

OPS = ["ema_topk_", "masked_merge", "masked_merge_", "masked_merge_backward", "masked_lora_linear", "masked_lora_linear_backward"]


@pytest.mark.parametrize("op", OPS)
def test_every_op_has_a_cpu_kernel_and_a_fake(op):
    name = f"sparse_adapt::{op}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "Meta")  # what register_fake installs


@pytest.mark.skipif(os.environ.get("SPARSE_ADAPT_CUDA") != "1", reason="the build was not required to have CUDA")
@pytest.mark.parametrize("op", OPS)
def test_cuda_kernels_were_built(op):
    """CI builds with SPARSE_ADAPT_CUDA=1: a build that silently lost its CUDA kernels fails here."""
    assert sa.has_cuda_kernels()
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"sparse_adapt::{op}", "CUDA")

