"""The demo's fine-tuning launched the way multi-GPU jobs are, on 2 CPU processes (gloo): torchrun and accelerate
launch give the same result as each other, and within rounding of one process on the same batches."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sparse_adapt import cli

pytestmark = pytest.mark.slow
ARGS = ["-m", "sparse_adapt", "demo", "--quick", "--layers", "2", "--steps", "2", "--threads", "1", "--no-progress"]
BIN = Path(sys.executable).parent


def launch(prefix, out):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(prefix + ARGS + ["--out", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "results.json").read_text())


def lors(result):
    return result["methods"][0]


def test_torchrun_and_accelerate_launch_match_one_process(tmp_path):
    torchrun = launch([str(BIN / "torchrun"), "--nproc_per_node", "2"], tmp_path / "torchrun")
    accelerate = launch([str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
                         "1", "--mixed_precision", "no", "--dynamo_backend", "no"], tmp_path / "accelerate")
    assert cli.main(ARGS[2:] + ["--out", str(tmp_path / "single")]) == 0
    single = json.loads((tmp_path / "single" / "results.json").read_text())
    assert "2 processes (DDP)" in torchrun["machine"] and "2 processes (DDP)" in accelerate["machine"]
    for result in (torchrun, accelerate):
        assert lors(result)["keeps_zeros"]
        assert lors(result)["merged_ppl"] == pytest.approx(lors(result)["adapted_ppl"], rel=1e-4)
        assert result["pruned_ppl"] == pytest.approx(single["pruned_ppl"], rel=1e-6)
        # same batches split over 2 ranks: the same training up to rounding (gradients averaged in another order)
        assert lors(result)["adapted_ppl"] == pytest.approx(lors(single)["adapted_ppl"], rel=1e-2)
        assert lors(result)["saved_bytes"] < 0.6 * lors(single)["saved_bytes"]  # each rank holds half a batch
    assert lors(torchrun)["adapted_ppl"] == pytest.approx(lors(accelerate)["adapted_ppl"], rel=1e-6)
