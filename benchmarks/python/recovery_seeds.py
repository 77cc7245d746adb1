"""Recovery over seeds: does LoRS recover the pruned model as well as SQFT and LoRA at the same budget?

For each seed (its own calibration, training and held-out texts, so its own pruned model), prune SmolLM2-135M
2:4 with Wanda and fine-tune every variant on the same tokens; report the merged held-out perplexity per seed and
its mean ± sd over the seeds, next to the activation memory counted exactly (bytes saved for backward) and the
median step time as ratios to LoRA measured in the same run.

    python benchmarks/python/recovery_seeds.py --quick --seeds 0 1 2 [--variants lors sqft ...]
    python benchmarks/python/recovery_seeds.py --quick --seeds 0 --variants spp@1e-3 spp@3e-3 spp@1e-2   # lr sweep

A variant is a method with options: lors (the default: STE gradients, gradient-SVD init with A's rows at LoRA's
row norm), lors+unit (the paper's unit rows), lors+exact (exact masked gradients), lors+zeros (zeros_B init),
sqft, lora, spp, roselora; `@lr` sets its learning rate (default: the demo's).
"""

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from sparse_adapt import demo
from sparse_adapt.demo.run import machine_description

VARIANTS = {
    "lors": dict(method="lors"),
    "lors+unit": dict(method="lors", init_row_norm=1.0),
    "lors+exact": dict(method="lors", exact_grad=True),
    "lors+exact+unit": dict(method="lors", exact_grad=True, init_row_norm=1.0),
    "lors+zeros": dict(method="lors", init="zeros_B"),
    "lors+exact+zeros": dict(method="lors", exact_grad=True, init="zeros_B"),
    "sqft": dict(method="sqft"),
    "lora": dict(method="lora"),
    "spp": dict(method="spp"),
    "roselora": dict(method="roselora"),
}


def parse_variant(name: str):
    base, _, lr = name.partition("@")
    if base not in VARIANTS:
        raise SystemExit(f"unknown variant {base!r}; known: {sorted(VARIANTS)}")
    spec = dict(VARIANTS[base])
    return spec.pop("method"), (float(lr) if lr else None), spec


def mean_sd(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the quick demo's budget (8 steps of 4 x 64 tokens)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--eval-every", type=int, default=None,
                   help="held-out evaluations along the way (default: the demo's; only the merged model is reported)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=["lora", "lors", "lors+exact", "lors+zeros", "sqft", "spp"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tag", default="")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    variants = {v: parse_variant(v) for v in args.variants}
    make = demo.DemoSettings.quick if args.quick else demo.DemoSettings
    overrides = {"steps": args.steps} if args.steps else {}
    if args.eval_every:
        overrides["eval_every"] = args.eval_every
    rows = {v: [] for v in variants}
    setting = None
    t_start = time.time()
    for seed in args.seeds:
        s = make(threads=args.threads, seed=seed, progress=False, **overrides)
        setting = s
        setup = demo.prepare(s)
        for v, (method, lr, options) in variants.items():
            torch.manual_seed(seed)
            try:
                r = demo.finetune(copy.deepcopy(setup.model), method, s, setup.train, setup.calibration,
                                  setup.eval_batches, setup.masks, lr=lr, **options)
            except ValueError as e:  # e.g. SPP at too high a lr: a factor 1 + s·A·b of exactly 0 refuses to merge
                print(f"seed {seed} {v}: failed: {e}", flush=True)
                r = demo.MethodResult(method, options.get("init", "?"))
            rows[v].append(dict(seed=seed, pruned_ppl=setup.pruned_ppl, dense_ppl=setup.dense_ppl,
                                merged_ppl=r.merged_ppl, adapted_ppl=r.adapted_ppl, keeps_zeros=r.keeps_zeros,
                                saved_bytes=r.saved_bytes, step_seconds=r.step_seconds, lr=lr or s.lr,
                                init=r.init))
            print(f"seed {seed} {v}: merged ppl {r.merged_ppl:.2f} (pruned {setup.pruned_ppl:.2f})", flush=True)
    s = setting
    lora = rows.get("lora")
    lines = [
        "# Recovery over seeds: merged held-out perplexity, mean ± sd",
        "",
        f"SmolLM2-135M-Instruct (dequantized Q4_1), all {setup.model_layers} decoder layers, {s.pruner} {s.sparsity}; "
        f"r={s.r}, alpha={s.alpha}, AdamW, {s.steps} steps x {s.batch_size} x {s.seq_len} tokens of Wikipedia "
        f"summaries; {s.eval_texts} held-out summaries. Each seed draws its own calibration, training and held-out "
        f"texts (so its own pruned model); every variant of a seed trains on the same tokens. "
        f"{machine_description(s)}; {(time.time() - t_start) / 60:.0f} min in all.",
        "",
        "| variant | init | lr | " + " | ".join(f"seed {x}" for x in args.seeds)
        + " | mean ± sd | keeps zeros | saved for backward vs LoRA | step time vs LoRA |",
        "|---|---|---:|" + "---:|" * len(args.seeds) + "---:|---|---:|---:|",
        "| pruned | | | " + " | ".join(f"{r['pruned_ppl']:.2f}" for r in next(iter(rows.values())))
        + " | {:.2f} ± {:.2f} | | | |".format(*mean_sd([r["pruned_ppl"] for r in next(iter(rows.values()))])),
    ]
    for v, rs in rows.items():
        m, sd = mean_sd([r["merged_ppl"] for r in rs])
        mem = (f"{statistics.mean(r['saved_bytes'] / b['saved_bytes'] for r, b in zip(rs, lora)):.2f}x"
               if lora else "")
        tim = (f"{statistics.mean(r['step_seconds'] / b['step_seconds'] for r, b in zip(rs, lora)):.2f}x"
               if lora else "")
        lines.append(f"| {v} | {rs[0]['init']} | {rs[0]['lr']:g} | "
                     + " | ".join(f"{r['merged_ppl']:.2f}" for r in rs)
                     + f" | **{m:.2f} ± {sd:.2f}** | {'yes' if all(r['keeps_zeros'] for r in rs) else 'no'} | "
                     f"{mem} | {tim} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"recovery-seeds-{'quick-' if args.quick else ''}cpu{args.tag}"
    (out / f"{name}.md").write_text(text)
    (out / f"{name}.json").write_text(json.dumps({"settings": {k: str(v) for k, v in vars(s).items()},
                                                  "rows": rows}, indent=1))
    print(f"written to {out / name}.md")


if __name__ == "__main__":
    main()
