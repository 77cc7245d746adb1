"""Knowledge editing on SmolLM2-135M with counterfactual capitals from countryinfo: RoseLoRA against LoRA (same
rank and steps) and FT-L (one MLP weight, ROME's L∞ constraint), on batches of 1 edit (each applied alone to a
fresh copy of the model, averaged) and of 10 edits at once. Only facts the model gets right before editing are
edited; other known capitals are the locality prompts.

    python benchmarks/python/knowledge_editing.py [--singles 10] [--batch 10] [--out benchmarks/results]
"""

import argparse
import copy
import time
from pathlib import Path

import torch

from sparse_adapt import edit
from sparse_adapt.assets import models


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--singles", type=int, default=10, help="single edits to average")
    p.add_argument("--batch", type=int, default=10, help="edits applied together")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--methods", default="lora,ft-l,roselora")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = models.load_smollm2()
    facts = edit.capital_facts()
    known = edit.known_facts(model, tokenizer, facts)
    print(f"the model knows {len(known)} of {len(facts)} capitals (first token)", flush=True)

    rows = []
    t0 = time.perf_counter()
    for method in args.methods.split(","):
        config = edit.EditConfig(method=method, steps=args.steps)
        singles = []
        for i in range(args.singles):
            edits, locality = edit.counterfactual_edits(known, 1, seed=100 + i)
            singles.append(edit.apply_edits(copy.deepcopy(model), tokenizer, edits, config, locality)[1])
        rows.append(edit.mean_metrics(singles))
        edits, locality = edit.counterfactual_edits(known, args.batch, seed=7)
        rows.append(edit.apply_edits(copy.deepcopy(model), tokenizer, edits, config, locality)[1])
        print(edit.results_table(rows[-2:]), flush=True)
    table = edit.results_table(rows)
    text = f"""# Knowledge editing: SmolLM2-135M-Instruct, counterfactual capitals

The model knows {len(known)} of {len(facts)} countryinfo capitals ("The capital of X is" -> first token right).
Edits move a known country's capital to another known capital; rephrasings: "X's capital is", "The capital city
of X is"; portability: "<new capital> is the capital of" -> X; locality: 20 other known capitals. {args.steps} Adam
steps per run; LoRA and RoseLoRA r=8 on every MLP down_proj (RoseLoRA: 95% sparse rows of A / columns of B at
the end); FT-L: model.layers.8.mlp.down_proj, each weight within ±5e-3 of its value. Rows "1 edit" average
{args.singles} single edits, each on a fresh copy of the model. CPU, {args.threads} threads, torch
{torch.__version__}; {time.perf_counter() - t0:.0f} s in all.

{table}
"""
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "knowledge-editing-cpu.md").write_text(text)


if __name__ == "__main__":
    main()
