"""Assemble the benchmark results of one machine into benchmarks/results/<machine>.md and <machine>.png.

    python benchmarks/python/report.py --layer build/bench/layer-cpu.json [--model build/bench/model-cpu.json]
                                       [--machine "AMD EPYC"] [--out benchmarks/results]

Inputs: the JSON of the C++ layer benchmark (benchmarks/cpp/bench_layer.cpp) and, optionally, of the whole-model
step (benchmarks/python/model_step.py). Everything is shown as a ratio to LoRA measured in the same run.
"""

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

METHODS = ["lora", "sqft", "sqft_gc", "spp", "spp_gc", "lors"]


def describe_machine(device: str) -> str:
    """The CPU's model name, or the GPU's."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "CPU"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def layer_tables(layer: dict) -> str:
    groups = defaultdict(dict)
    for row in layer["layers"]:
        groups[(row["out"], row["in"], row["tokens"], row["rank"])][row["method"]] = row
    has_peak = any(r["peak"] >= 0 for r in layer["layers"])
    head = "| layer (out x in) | tokens | r | " + " | ".join(METHODS) + " |"
    sep = "|---|---:|---:|" + "---:|" * len(METHODS)
    out = ["**Time**, median of the step, as a ratio to LoRA (LoRA's ms in brackets):", "", head, sep]
    for (o, i, t, r), rows in groups.items():
        lora = rows["lora"]
        cells = [f"{rows[m]['ms'] / lora['ms']:.2f}x" + (f" ({lora['ms']:.1f} ms)" if m == "lora" else "")
                 for m in METHODS]
        out.append(f"| {o}x{i} | {t} | {r} | " + " | ".join(cells) + " |")
    out += ["", "**Saved for backward**, exact, as a ratio to LoRA (LoRA's MiB in brackets):", "", head, sep]
    for (o, i, t, r), rows in groups.items():
        lora = rows["lora"]
        cells = [f"{rows[m]['saved'] / lora['saved']:.2f}x" + (f" ({lora['saved'] / 2**20:.2f})" if m == "lora" else "")
                 for m in METHODS]
        out.append(f"| {o}x{i} | {t} | {r} | " + " | ".join(cells) + " |")
    if has_peak:
        out += ["", "**Peak allocated during the step**, as a ratio to LoRA:", "", head, sep]
        for (o, i, t, r), rows in groups.items():
            cells = [f"{rows[m]['peak'] / rows['lora']['peak']:.2f}x" for m in METHODS]
            out.append(f"| {o}x{i} | {t} | {r} | " + " | ".join(cells) + " |")
    out += ["", "**masked_merge** (read weight, write the result) against a copy of the same bytes:", "",
            "| layer (out x in) | r | weight -> merged | ms | GB/s | copy GB/s | of copy |",
            "|---|---:|---|---:|---:|---:|---:|"]
    for m in layer["merge"]:
        path = f"{m.get('from', layer['dtype'])} -> {m.get('to', layer['dtype'])}"
        out.append(f"| {m['out']}x{m['in']} | {m['rank']} | {path} | {m['ms']:.3f} | {m['gbs']:.1f} | "
                   f"{m['copy_gbs']:.1f} | {100 * m['gbs'] / m['copy_gbs']:.0f}% |")
    return "\n".join(out)


def plot(layer: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = layer["layers"]
    largest = max({(r["out"], r["in"]) for r in rows}, key=lambda s: s[0] * s[1])
    rank = min(r["rank"] for r in rows)
    sel = [r for r in rows if (r["out"], r["in"]) == largest and r["rank"] == rank]
    tokens = sorted({r["tokens"] for r in sel})
    by = {(r["method"], r["tokens"]): r for r in sel}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for method in METHODS:
        axes[0].plot(tokens, [by[method, t]["ms"] / by["lora", t]["ms"] for t in tokens], marker="o", label=method)
        axes[1].plot(tokens, [by[method, t]["saved"] / by["lora", t]["saved"] for t in tokens], marker="o",
                     label=method)
    for ax, what in zip(axes, ("time", "saved for backward")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(tokens, [str(t) for t in tokens])
        ax.set_xlabel("tokens")
        ax.set_ylabel(f"{what} / LoRA's")
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set_title(f"{what}: {largest[0]}x{largest[1]}, r={rank}, {layer['dtype']}")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layer", required=True)
    p.add_argument("--model")
    p.add_argument("--machine", help="what the numbers were measured on, in words (default: the CPU's or GPU's name)")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    layer = json.loads(Path(args.layer).read_text())
    args.machine = args.machine or describe_machine(layer["device"])
    name = slug(f"{args.machine}-{layer['device']}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = [f"# Benchmarks: {args.machine}", "",
            f"torch {layer['torch']}, {layer['device']}, {layer['threads']} thread(s), {layer['dtype']}; one adapted "
            "linear layer at 50% unstructured sparsity, forward + backward (gradients of x, A, B), every method in "
            "the same run (benchmarks/cpp/bench_layer.cpp).", "", layer_tables(layer), "",
            f"![time and memory ratios]({name}.png)", ""]
    if args.model:
        from model_step import table  # noqa: E402  (same folder)

        model = json.loads(Path(args.model).read_text())
        m = model["meta"]
        text += ["## Whole-model training step", "",
                 f"SmolLM2-135M-Instruct pruned 2:4, all 210 projections adapted (r={m['rank']}), {m['batch_size']} x "
                 f"{m['seq_len']} tokens, AdamW; {m['device']}, {m['threads']} thread(s); each method in a fresh "
                 "process (benchmarks/python/model_step.py). Peak memory: process peak RSS on the CPU, "
                 "max_memory_allocated on CUDA.", "", table(model["rows"]), ""]
    (out / f"{name}.md").write_text("\n".join(text))
    plot(layer, out / f"{name}.png")
    print(f"written {out / (name + '.md')} and {out / (name + '.png')}")


if __name__ == "__main__":
    main()
