"""RoseLoRA on the real SmolLM2-135M over real Wikipedia text: the loss falls, every row of A and column of B
ends at the target sparsity, B @ A is at least as sparse as Proposition 1 says, and the pruner's cost is a small
fraction of a training step.

    python benchmarks/python/roselora_smollm2.py [--steps 30] [--threads 2] [--out benchmarks/results]
"""

import argparse
import statistics
import time
from pathlib import Path

import torch

import sparse_adapt as sa
from sparse_adapt.assets import models
from sparse_adapt.assets import text as data
from sparse_adapt.lm import lm_batches
from sparse_adapt.training import kept_count


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)

    model, tokenizer = models.load_smollm2()
    model.to(args.device).train()
    t_init, t_final = max(1, args.steps // 10), int(args.steps * 0.7)
    config = sa.RoseLoraConfig(r=args.rank, alpha=2 * args.rank, sparsity=args.sparsity, beta=0.8,
                               t_init=t_init, t_final=t_final, target_modules="all-linear")
    sa.inject(model, config)
    pruner = sa.RoseLoraPruner(model, total_steps=args.steps)
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=args.lr)
    train_texts, eval_texts = data.wiki_split(args.steps * args.batch_size, 16, seed=1)
    eval_batches = lm_batches(tokenizer, eval_texts, args.batch_size, args.length)

    @torch.no_grad()
    def held_out_loss():
        model.eval()
        losses = [model(**{k: v.to(args.device) for k, v in b.items()}).loss.item() for b in eval_batches]
        model.train()
        return statistics.mean(losses)

    loss_before = held_out_loss()
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    losses, step_times, prune_times = [], [], []
    for step, batch in enumerate(lm_batches(tokenizer, train_texts, args.batch_size, args.length), 1):
        batch = {k: v.to(args.device) for k, v in batch.items()}
        sync()
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        sync()
        t1 = time.perf_counter()
        fraction = pruner.step()
        sync()
        t2 = time.perf_counter()
        losses.append(loss.item())
        step_times.append(t1 - t0)
        prune_times.append(t2 - t1)
        print(f"step {step:3d}  loss {loss.item():.3f}  kept {fraction:.3f}  step {t1 - t0:.2f}s  "
              f"prune {1e3 * (t2 - t1):.1f}ms", flush=True)

    loss_after = held_out_loss()
    report = sa.sparsity_report(model)
    layers = list(sa.adapter_layers(model))
    at_target = sum(
        bool((layer.lora_A != 0).sum(1).eq(kept_count(1 - args.sparsity, layer.in_features)).all()
             and (layer.lora_B != 0).sum(0).le(kept_count(1 - args.sparsity, layer.out_features)).all())
        for _, layer in layers)
    bound_holds = sum(row.bound_holds for row in report)
    counts = sa.trainable_parameters(model)
    delta = torch.tensor([row.delta for row in report])
    bound = torch.tensor([row.bound for row in report])
    ratio = statistics.median(prune_times) / statistics.median(step_times)
    head = 10
    text = f"""# RoseLoRA on SmolLM2-135M-Instruct

{args.steps} steps of {args.batch_size} x {args.length} tokens of Wikipedia summaries, r={args.rank},
sparsity {args.sparsity} (t_init={t_init}, t_final={t_final}), AdamW lr {args.lr}, all 210 projections,
device {args.device}, {args.threads} thread(s), torch {torch.__version__}.

- held-out loss (16 other summaries): {loss_before:.3f} before, {loss_after:.3f} after; training loss: first 3
  steps {statistics.mean(losses[:3]):.3f}, last 3 steps {statistics.mean(losses[-3:]):.3f}
- layers whose every row of A holds exactly k={kept_count(1 - args.sparsity, 576)}..{kept_count(1 - args.sparsity,
                                                                                                 1536)}
  non-zeros and every column of B at most its k: {at_target} / {len(layers)}
- Proposition 1 bound holds on {bound_holds} / {len(report)} layers; s(B@A) over layers: min {delta.min():.4f},
  mean {delta.mean():.4f}; its bound: min {bound.min():.4f}, mean {bound.mean():.4f}
- {counts}
- median training step {statistics.median(step_times):.3f} s, median pruner.step() {
    1e3 * statistics.median(prune_times):.1f} ms:
  **{100 * ratio:.2f}% of a step**

First {head} layers of the sparsity report:

{chr(10).join(report.to_markdown().splitlines()[:head + 2])}
"""
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"roselora-smollm2-{args.device}-{args.threads}t.md"
    (out / name).write_text(text)
    print(f"written to {out / name}")


if __name__ == "__main__":
    main()
