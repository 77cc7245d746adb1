"""sparse_adapt under DistributedDataParallel and FSDP2 (fully_shard), 2 CPU processes with gloo: a few steps of
every method give the adapter weights -- and RoseLoRA the masks -- of one process on the combined batch; the
gradient-SVD init agrees too (before and after sharding); the saved file is the single-process one, and merging it
keeps the zero pattern."""

import json
import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

import sparse_adapt as sa

import dist_worker
from toy_models import make_model

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    for mode in ("ddp", "fsdp"):
        mp.spawn(dist_worker.worker, args=(2, mode, str(root), free_port()), nprocs=2, join=True)
    for method in dist_worker.METHODS:
        dist_worker.reference(method, root / "single" / method)
    dist_worker.reference("lors", root / "single" / "gradient_svd", init="gradient_svd")
    return root


def assert_same_adapter(directory, reference, exact_zeros):
    got, want = load_file(directory / "adapter_model.safetensors"), load_file(reference / "adapter_model.safetensors")
    assert set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}")
        if exact_zeros:
            assert torch.equal(got[key] == 0, want[key] == 0), f"{key}: the mask differs from one process's"
    def config(d):  # the same file but for the id of the save
        meta = json.loads((d / "adapter_config.json").read_text())
        assert len(meta.pop("save_id")) == 32
        return meta

    assert config(directory) == config(reference)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
@pytest.mark.parametrize("method", dist_worker.METHODS)
def test_training_matches_one_process(runs, mode, method):
    assert_same_adapter(runs / mode / method, runs / "single" / method, exact_zeros=method == "roselora")


@pytest.mark.parametrize("name", ["ddp/gradient_svd", "fsdp/gradient_svd", "fsdp/gradient_svd_sharded"])
def test_gradient_svd_init_matches_one_process(runs, name):
    """Same subspaces: the averaged gradient differs from one process's by rounding only, and a randomized SVD
    turns that into small rotations among nearly equal singular vectors, so the rows are compared as subspaces."""
    got = load_file(runs / name / "adapter_model.safetensors")
    want = load_file(runs / "single" / "gradient_svd" / "adapter_model.safetensors")
    assert set(got) == set(want)
    for key in want:
        if key.endswith("lora_B"):
            assert torch.count_nonzero(got[key]) == 0
        else:
            g, w = (torch.nn.functional.normalize(t, dim=1) for t in (got[key], want[key]))
            cosines = torch.linalg.svdvals(g @ w.T)
            assert cosines.min() > 0.999, f"{key}: principal-angle cosines {cosines.tolist()}"


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
@pytest.mark.parametrize("method", ["lors", "sqft", "spp_gc", "roselora"])
def test_merging_the_distributed_adapter(runs, mode, method):
    model, _ = make_model("attention")
    pruned = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    sa.load_adapter(model, runs / mode / method)
    sa.merge(model)
    for name, w in pruned.items():
        merged = model.get_submodule(name).weight
        assert not torch.equal(merged, w), f"{name} was not adapted"
        if method in sa.adapters.SPARSITY_PRESERVING:
            assert torch.equal(merged == 0, w == 0)
