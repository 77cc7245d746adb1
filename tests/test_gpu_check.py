"""The one-call GPU check cannot rot: its dry run prints the whole plan and runs, on this CPU, every step a CPU
can (the CUDA tests' collection, the layer benchmark, the ema_topk_ benchmark, the static SASS report)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    if not (ROOT / "build" / "cmake" / "bench_layer").exists():
        pytest.skip("needs the C++ benchmarks (make cpp)")
    proc = subprocess.run([sys.executable, "scripts/gpu_check.py", "--dry-run", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    steps = {s["name"]: s["status"] for s in summary["steps"]}
    assert list(steps) == ["build", "tests", "sanitizer", "layer", "topk", "static", "models", "model-step"]
    assert steps["build"] == "needs a GPU"
    for name in ("tests", "layer", "topk", "models"):
        assert steps[name] == "ok", (name, steps[name])
    # The plan names only files that exist.
    for path in ("setup.py", "scripts/cmake-build.sh", "benchmarks/python/ema_topk_bench.py",
                 "benchmarks/cuda_static.py", "benchmarks/python/model_step.py"):
        assert path in proc.stdout and (ROOT / path).exists()
    # Every CUDA case of the op and model suites is selected by the marker the check uses.
    log = (tmp_path / "log.txt").read_text()
    collected = [int(m.group(1)) for m in re.finditer(r"(\d+)(?:/\d+)? tests? collected", log)]
    assert len(collected) == 2 and all(n > 0 for n in collected), collected
    layer = json.loads((tmp_path / "layer.json").read_text())
    assert {r["method"] for r in layer["layers"]} == {"lora", "sqft", "sqft_gc", "spp", "spp_gc", "lors"}
    assert (tmp_path / "summary.md").read_text().startswith("# GPU check (dry run")
