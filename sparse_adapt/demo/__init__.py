"""The main job, an application of the library: prune a real model, recover it with LoRS (and the baselines),
merge, and prove that the sparsity survived. ``sparse-adapt demo`` / ``python -m sparse_adapt demo`` run it.

SmolLM2-135M-Instruct (its Q4_1 release, dequantized to float32) and held-out Wikipedia summaries, both loaded
offline. Dense perplexity -> prune (Wanda 2:4 by default) -> perplexity -> fine-tune for a fixed token budget ->
perplexity -> merge -> check every merged weight's zero pattern against the pruned one -> perplexity of the merged
model (it must equal the adapted model's). Not imported by ``import sparse_adapt``.

- settings.py   DemoSettings (and the quick variant)
- run.py        prepare (load, prune), finetune (one method), run_demo (all of them)
- launch.py     the demo's data-parallel glue (torchrun / accelerate launch)
- report.py     the report, the table, the plot
"""

from .report import plot, render_report, results_table, write_outputs
from .run import DemoResult, MethodResult, PrunedSetup, finetune, method_config, prepare, run_demo
from .settings import DemoSettings

__all__ = ["DemoResult", "DemoSettings", "MethodResult", "PrunedSetup", "finetune", "method_config", "plot",
           "prepare", "render_report", "results_table", "run_demo", "write_outputs"]
