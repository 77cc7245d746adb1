"""Knowledge editing on SmolLM2-135M: counterfactual edits of countryinfo relations (capital, continent and
official language; the model knows too few demonyms for that relation), RoseLoRA against LoRA (same rank, steps
and recipe) and FT-L (one MLP weight, ROME's L∞ constraint), as single edits (each on a fresh copy of the model,
averaged) and as a batch of edits in one call (the default recipe makes them one after another, each holding the
earlier ones). Only facts the model gets right before editing are edited or used as neighbours.

Two locality metrics, both reported: strict neighbourhood locality (the share of other countries of the *same*
relation whose greedy continuation still begins with their true answer -- held out: the editor never sees them)
and EasyEdit's agreement of unrelated prompts' continuations with the unedited model's.

    python benchmarks/python/knowledge_editing.py [--singles 6] [--batch 15] [--ablation] [--out benchmarks/results]

A relation the model knows too few facts of is skipped with a message.
"""

import argparse
import copy
import json
import time
from dataclasses import replace
from pathlib import Path

import torch
from report import describe_machine  # same folder

from sparse_adapt import edit
from sparse_adapt.assets import models

# The levers of the editing recipe, measured one at a time from plain training to the default (--ablation).
_JOINT = dict(preserve_after=0, group_size=None)  # before those levers: a batch trained as one
ABLATION = [
    ("plain: 40 steps on the prompt", dict(preserve=0.0, neighbors=0, prefixes=0, early_stop=False, **_JOINT)),
    ("+ preservation (KL, weight 20, on 32 random Wikipedia titles)",
     dict(similar_neighbors=0.0, prefixes=0, early_stop=False, **_JOINT)),
    ("+ 4 generic prefixes", dict(similar_neighbors=0.0, early_stop=False, **_JOINT)),
    ("+ early stop", dict(similar_neighbors=0.0, **_JOINT)),
    ("+ half the neighbours the titles most like the subject", _JOINT),
    ("+ KL on the unedited model's 16 tokens after the new answer", dict(group_size=None)),
    ("+ a batch applied one edit after another, each holding the earlier edits and every edit's neighbours "
     "(the default)", dict()),
    ("default, the 16 tokens held to what followed the model's own answer", dict(after="own_answer")),
    ("default, decoder layers 2-12 only", dict(layers=(2, 12))),
]


def run(model, tokenizer, known, relation, config, singles, batch, seeds=100):
    """(mean of single edits, batch edit) metrics for one config on one relation."""
    results = []
    for i in range(singles):
        edits, locality = edit.counterfactual_edits(known, 1, seed=seeds + i, relation=relation)
        results.append(edit.apply_edits(copy.deepcopy(model), tokenizer, edits, config, locality)[1])
    single = edit.mean_metrics(results)
    batched = None
    if batch:
        edits, locality = edit.counterfactual_edits(known, batch, seed=7, relation=relation, neighbors=8)
        batched = edit.apply_edits(copy.deepcopy(model), tokenizer, edits, config, locality)[1]
    return single, batched


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    markers = {"roselora": "o", "lora": "s", "ft-l": "^"}
    for r in rows:
        m = r["metrics"]
        ax.scatter(m["neighborhood"], m["edit_success"], marker=markers.get(m["method"], "x"),
                   s=40 if m["edits"] == 1 else 90, label=f"{m['method']} {r['relation']} x{m['edits']}")
    ax.set_xlabel("strict neighbourhood locality")
    ax.set_ylabel("edit success")
    ax.set_xlim(-0.05, 1.05)
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    ax.set_title("Knowledge editing on SmolLM2-135M (upper right is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--singles", type=int, default=6, help="single edits to average, per relation")
    p.add_argument("--batch", type=int, default=15, help="edits applied together (0: none)")
    p.add_argument("--relations", default="capital,continent,language")
    p.add_argument("--methods", default="roselora,lora,ft-l")
    p.add_argument("--ablation", action="store_true", help="measure each lever of the recipe (RoseLoRA, capitals)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--tag", default="", help="inserted into the output file names")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = models.load_smollm2()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    known = {}
    for relation in args.relations.split(","):
        facts = edit.relation_facts(relation)
        found = edit.known_facts(model, tokenizer, facts, relation)
        print(f"{relation}: the model knows {len(found)} of {len(facts)}", flush=True)
        if len(found) >= max(args.batch, 1) + 2:
            known[relation] = found

    if args.ablation:
        lines = ["| recipe | edits | edit success | generalization | neighbourhood (strict) | neighbourhood, rephrased "
                 f"| locality (agreement) | {edit.EditMetrics.FLUENCY_HEADER} | fluency after the rephrasings (before) "
                 "| weights changed |",
                 "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        default = edit.EditConfig()
        for name, overrides in ABLATION:
            config = replace(default, **overrides)
            single, batched = run(model, tokenizer, known["capital"], "capital", config, args.singles, args.batch)
            for m in (single, batched):
                if m is not None:
                    lines.append(f"| {name} | {m.edits} | {m.edit_success:.3f} | {m.generalization:.3f} | "
                                 f"{m.neighborhood:.3f} | {m.neighborhood_rephrased:.3f} | {m.locality:.3f} | "
                                 f"{m.fluency_cell()} | {m.fluency_rephrased_cell()} | {m.weights_changed:,} |")
            print("\n".join(lines[-2:]), flush=True)
        text = (f"# Knowledge editing recipe: ablation (RoseLoRA, capitals, SmolLM2-135M)\n\nEach row adds one lever "
                f"to the one above; single edits average {args.singles} edits on fresh copies, the batch row edits "
                f"{args.batch} at once. {describe_machine('cpu')}, {args.threads} threads, torch {torch.__version__}; "
                f"{time.perf_counter() - t0:.0f} s.\n\n" + "\n".join(lines) + "\n")
        print(text)
        (out / "knowledge-editing-ablation-cpu.md").write_text(text)
        return

    rows = []
    for relation in known:
        for method in args.methods.split(","):
            config = edit.EditConfig(method=method)
            single, batched = run(model, tokenizer, known[relation], relation, config, args.singles, args.batch)
            for m in (single, batched):
                if m is not None:
                    rows.append({"relation": relation, "metrics": m.as_row()})
                    print(relation, edit.results_table([m]).splitlines()[-1], flush=True)
    header = edit.results_table([]).splitlines()
    table = "\n".join(["| relation " + header[0], "|---" + header[1]] + [
        f"| {r['relation']} " + edit.results_table([edit.EditMetrics(**r["metrics"])]).splitlines()[-1]
        for r in rows])
    c = edit.EditConfig()
    layers = "every decoder layer" if c.layers is None else f"decoder layers {c.layers[0]}-{c.layers[1]}"
    after = "after its own answer" if c.after == "own_answer" else "there"
    text = f"""# Knowledge editing: SmolLM2-135M-Instruct, counterfactual countryinfo facts

Known facts (whole answer = greedy continuation): {", ".join(f"{k} {len(v)}" for k, v in known.items())}.
Each edit moves a known country's fact to another known country's; rephrasings are two other phrasings of the
relation (each one the unedited model answers right for at least half its known facts); neighbours (strict
locality) are up to 20 (8 per edit in the batch) other known countries of the same relation, held out from the
editor, which sees only the edit request and generic text. Default `EditConfig`: {c.steps} steps of Adam at lr
{c.lr} (up to {c.extra_steps} more for an edit that has not held), r={c.r} on `mlp.down_proj` of {layers}, KL weight
{c.preserve} on {c.neighbors} neighbour prompts per edit (the edit's template filled with Wikipedia titles,
{c.similar_neighbors:.0%} of them those the model represents most like the edit's subject, never one the edit is
measured on; in a batch each edit also holds {c.neighbors} of the other edits', drawn per step; all against the
unedited model), {c.prefixes}
generic-text prefixes, early stop {c.early_stop}, KL also on the {c.preserve_after} tokens after the new answer
(held to the unedited model's {after}), a batch made in groups of {c.group_size} edit(s), each holding the
earlier; RoseLoRA {c.sparsity:.0%} sparse rows of A / columns of B at the end; FT-L: {c.ft_module}, each weight
within ±{c.ft_max_change}. Rows "1" average {args.singles} single edits,
each on a fresh copy of the model. {describe_machine('cpu')}, {args.threads} threads, torch {torch.__version__};
{time.perf_counter() - t0:.0f} s in all.

{table}

![edit success vs strict locality](knowledge-editing{args.tag}-cpu.png)
"""
    print(text)
    (out / f"knowledge-editing{args.tag}-cpu.md").write_text(text)
    (out / f"knowledge-editing{args.tag}-cpu.json").write_text(json.dumps(rows, indent=1))
    plot(rows, out / f"knowledge-editing{args.tag}-cpu.png")


if __name__ == "__main__":
    main()
