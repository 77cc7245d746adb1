"""The static SASS report on the built library (no GPU): every arch PyTorch's CUDA 13 wheels run on has a cubin
(and the newest has PTX), and the merge's 16-byte kernels really load and store 16 bytes per instruction, with
evict-first stores and no spills, on sm_90."""

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

import sparse_adapt as sa

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("cuda_static", ROOT / "benchmarks" / "cuda_static.py")
cuda_static = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cuda_static)

pytestmark = pytest.mark.skipif(not sa.has_cuda_kernels(), reason="built without CUDA kernels")


@pytest.fixture(scope="module")
def report():
    tool = cuda_static.find_cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump")
    return cuda_static.report(cuda_static.find_library(), tool)


@pytest.mark.skipif(bool(os.environ.get("TORCH_CUDA_ARCH_LIST")), reason="a custom arch list was asked for")
def test_every_gpu_generation_has_an_image(report):
    assert report["cubins"] == ["sm_75", "sm_80", "sm_90", "sm_100", "sm_120"]
    assert report["ptx"] == ["sm_120"]  # PTX of the newest, for GPUs after it


def test_the_kernels_are_what_they_are_built_to_be(report):
    assert cuda_static.check(report) == []


def test_check_catches_a_missing_property(report):
    """The check is not vacuous: a kernel whose stores were 2 bytes wide fails it."""
    doctored = json.loads(json.dumps(report))
    for k in doctored["kernels"]:
        merge_bf16 = "masked_merge_kernel<c10::BFloat16, c10::BFloat16, float, true, false>"
        if k["arch"] == "sm_90" and k["kernel"] == merge_bf16:
            k["global_stores"] = {"2": 8}
    assert any("stg128" in f for f in cuda_static.check(doctored))


def test_cli_writes_the_report(tmp_path):
    assert cuda_static.main(["--out", str(tmp_path), "--check"]) == 0
    assert "masked_merge_kernel" in (tmp_path / "cuda-static.md").read_text()
    sys.stdout.flush()
