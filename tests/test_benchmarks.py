"""The benchmark tooling runs end to end on a tiny configuration: the C++ layer benchmark (built by `make cpp`)
and the report that turns its JSON into the results page and plot. (The C++ smoke run is also a ctest.)"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "build" / "cmake" / "bench_layer"


@pytest.mark.skipif(not BENCH.exists(), reason="the C++ benchmarks are not built (make cpp)")
def test_layer_benchmark_and_report(tmp_path):
    layer_json = tmp_path / "layer.json"
    subprocess.run([str(BENCH), "--quick", "--reps", "1", "--json", str(layer_json)], check=True,
                   capture_output=True)
    layer = json.loads(layer_json.read_text())
    rows = {r["method"]: r for r in layer["layers"]}
    assert set(rows) == {"lora", "sqft", "sqft_gc", "spp", "spp_gc", "lors"}
    # the memory accounting is exact: LoRA keeps x (16x32 floats) and x Aᵀ (16x4); LoRS and the checkpointed
    # baselines keep only x; SQFT also keeps the merged 64x32 weight and its 64x32 bool mask
    assert rows["lora"]["saved"] == (16 * 32 + 16 * 4) * 4
    assert rows["lors"]["saved"] == rows["sqft_gc"]["saved"] == rows["spp_gc"]["saved"] == 16 * 32 * 4
    assert rows["sqft"]["saved"] >= 16 * 32 * 4 + 64 * 32 * 4 + 64 * 32
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "python" / "report.py"), "--layer", str(layer_json),
                    "--machine", "test machine", "--out", str(tmp_path)], check=True, capture_output=True)
    page = (tmp_path / "test-machine-cpu.md").read_text()
    assert "**Time**" in page and "| 64x32 | 16 | 4 |" in page and "masked_merge" in page
    assert (tmp_path / "test-machine-cpu.png").stat().st_size > 10_000


@pytest.mark.slow
def test_model_step_benchmark_on_random_weights(tmp_path):
    """The whole-model step benchmark, in its mode for a machine without the model files (a lent GPU): each method
    in its own process on SmolLM2-135M's shapes at random initialisation, its saved bytes counted exactly."""
    out = tmp_path / "model.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "python" / "model_step.py"), "--methods", "lora,lors",
                    "--random-weights", "smollm2-135m", "--batch-size", "1", "--seq-len", "16", "--reps", "1",
                    "--threads", "1", "--bf16", "--json", str(out)], check=True, capture_output=True, timeout=600)
    data = json.loads(out.read_text())
    assert data["meta"]["model"] == "smollm2-135m (random weights)" and data["meta"]["autocast"] == "bf16"
    rows = {r["method"]: r for r in data["rows"]}
    assert set(rows) == {"lora", "lors"} and all(r["step_s"] > 0 for r in rows.values())
    # LoRS recomputes its merged weight in backward instead of saving it: it saves no more than LoRA
    assert 0 < rows["lors"]["saved_bytes"] <= rows["lora"]["saved_bytes"]
