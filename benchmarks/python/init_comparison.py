"""Does LoRS's gradient-SVD initialisation help? On the 2:4-pruned SmolLM2-135M, fine-tune with LoRS from
`gradient_svd` and from `zeros_B` (kaiming A, zero B) with the same seed, data and budget, and compare the
held-out perplexity along the way.

    python benchmarks/python/init_comparison.py [--steps 40] [--threads 2] [--out benchmarks/results]
"""

import argparse
import copy
from pathlib import Path

import torch

from sparse_adapt import demo
from sparse_adapt.demo.run import machine_description


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    make = demo.DemoSettings.quick if args.quick else demo.DemoSettings
    s = make(steps=args.steps, eval_every=args.eval_every, threads=args.threads, lr=args.lr, progress=False)
    setup = demo.prepare(s)
    results = {}
    for init in ("zeros_B", "gradient_svd"):
        torch.manual_seed(s.seed)
        results[init] = demo.finetune(copy.deepcopy(setup.model), "lors", s, setup.train, setup.calibration,
                                          setup.eval_batches, setup.masks, init=init)
    steps = [h["step"] for h in results["zeros_B"].history]
    lines = [
        "# LoRS: gradient-SVD init vs zeros_B",
        "",
        f"SmolLM2-135M-Instruct (dequantized Q4_1), {s.pruner} {s.sparsity}; LoRS r={s.r}, alpha={s.alpha}, AdamW "
        f"lr {s.lr}, {s.steps} steps x {s.batch_size} x {s.seq_len} tokens of Wikipedia summaries, same seed and "
        f"data; held-out perplexity on {s.eval_texts} other summaries. {machine_description(s)}.",
        f"Dense {setup.dense_ppl:.2f}, pruned {setup.pruned_ppl:.2f}.",
        "",
        "| init | " + " | ".join(f"step {t}" for t in steps) + " |",
        "|---|" + "---:|" * len(steps),
    ]
    for init, r in results.items():
        lines.append(f"| {init} | " + " | ".join(f"{h['ppl']:.2f}" for h in r.history) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"init-comparison-cpu-{s.threads}t.md"
    path.write_text(text)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
