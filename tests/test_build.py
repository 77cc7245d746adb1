"""What was built: the CPU kernels always, the CUDA kernels whenever the build was asked to have them."""

import os

import pytest
import torch

import sparse_adapt as sa

KERNEL_OPS = ["ema_topk_", "ema_topk_multi_", "masked_merge", "masked_merge_"]  # with device code
GENERIC_OPS = ["masked_merge_backward", "masked_lora_linear", "masked_lora_linear_backward"]  # ATen only


@pytest.mark.parametrize("op", KERNEL_OPS + GENERIC_OPS)
def test_every_op_has_a_cpu_kernel_and_a_fake(op):
    name = f"sparse_adapt::{op}"
    key = "CPU" if op in KERNEL_OPS else "CompositeExplicitAutograd"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, key)
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "Meta")  # what register_fake installs


def test_masked_lora_linear_has_autocast_kernels():
    for key in ("AutocastCPU", "AutocastCUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key("sparse_adapt::masked_lora_linear", key)


@pytest.mark.skipif(os.environ.get("SPARSE_ADAPT_CUDA") != "1", reason="the build was not required to have CUDA")
@pytest.mark.parametrize("op", KERNEL_OPS)
def test_cuda_kernels_were_built(op):
    """CI builds with SPARSE_ADAPT_CUDA=1: a build that silently lost its CUDA kernels fails here."""
    assert sa.has_cuda_kernels()
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"sparse_adapt::{op}", "CUDA")
