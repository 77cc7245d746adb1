import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Small matmuls on a busy 2-core machine run many times slower with 2 threads than with 1.
torch.set_num_threads(int(os.environ.get("SPARSE_ADAPT_TEST_THREADS", "1")))

# Derandomized so that CI runs the same examples every time; SPARSE_ADAPT_HYPOTHESIS=explore searches wider.
settings.register_profile(
    "ci", max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("explore", max_examples=500, deadline=None)
settings.load_profile(os.environ.get("SPARSE_ADAPT_HYPOTHESIS", "ci"))

# Every CUDA case carries the `cuda` marker, so `pytest -m cuda` (make gpu-check) runs exactly them.
CUDA_ONLY = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DEVICES = ["cpu", pytest.param("cuda", marks=CUDA_ONLY)]


def pytest_collection_modifyitems(items):
    for item in items:
        skips = [m for m in item.iter_markers() if m.name == "skipif"]
        if any("needs a CUDA GPU" in str(m.kwargs.get("reason", "")) for m in skips):
            item.add_marker(pytest.mark.cuda)


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param
