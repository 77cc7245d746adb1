"""The meta-device count of saved bytes (benchmarks/python/memory_at_scale.py) is the count a real run makes:
checked on a tiny Llama with real tensors, for every method."""

import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("memory_at_scale", ROOT / "benchmarks" / "python" / "memory_at_scale.py")
mem = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mem)


@pytest.mark.parametrize("method", mem.METHODS)
def test_meta_count_equals_real_count(method):
    pytest.importorskip("transformers")
    tiny = mem.CONFIGS["tiny"]
    meta, trainable_meta = mem.saved_bytes(tiny, method, 4, 2, 16, torch.float32, device="meta")
    real, trainable_real = mem.saved_bytes(tiny, method, 4, 2, 16, torch.float32, device="cpu")
    assert meta == real > 0 and trainable_meta == trainable_real


def test_the_ordering_the_table_shows():
    """SQFT and SPP keep out x in tensors per layer, LoRS keeps what LoRA keeps (here on the tiny model)."""
    tiny = mem.CONFIGS["tiny"]
    got = {m: mem.saved_bytes(tiny, m, 4, 2, 16, torch.bfloat16)[0] for m in ("lora", "sqft", "spp", "lors")}
    assert got["lors"] <= got["lora"] < got["sqft"] and got["lora"] < got["spp"]
