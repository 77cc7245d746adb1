"""A whole-model training step per method: SmolLM2-135M pruned 2:4 (magnitude), every projection adapted.

With --random-weights ARCH the model is that architecture at random initialisation and the batch is random token ids:
for timing on a machine without the model files (a lent GPU). Times and memory do not depend on the weights' values;
ARCH is smollm2-135m (the same shapes as the real model) or llama3.2-1b (Llama-3.2-1B's shapes: 16 layers of
2048 x 8192, a size that keeps a GPU busy).

Each (method, eager|compiled) runs in a fresh subprocess, so that its process peak RSS is its own. Reported: median
step time (forward + backward + AdamW), the bytes saved for backward by one step (exact, activations only: every
saved storage that is not a parameter or buffer), peak RSS of the process on the CPU and max_memory_allocated on
CUDA -- each also as a ratio to plain LoRA measured in the same run.

    python benchmarks/python/model_step.py [--device cpu] [--threads 2] [--methods lora,lors,...] [--compile]
                                           [--json build/bench/model-cpu.json] [--random-weights ARCH]
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

METHODS = ["lora", "sqft", "sqft_gc", "spp", "spp_gc", "lors"]
# Llama-architecture shapes for --random-weights (the published configs' sizes; nothing is downloaded).
ARCHS = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "llama3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
}


def random_model(arch: str, device: str, batch_size: int, seq_len: int):
    """(model, batch): `arch` at random initialisation, made on `device`, and a batch of random token ids."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**ARCHS[arch], max_position_embeddings=max(2048, seq_len))
    with torch.device(device):
        model = LlamaForCausalLM(config)
    ids = torch.randint(0, config.vocab_size, (batch_size, seq_len), generator=torch.Generator().manual_seed(3))
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def real_model(batch_size: int, seq_len: int):
    """(model, batch): SmolLM2-135M-Instruct and a batch of the shipped Wikipedia summaries."""
    from sparse_adapt.assets import models
    from sparse_adapt.assets import text as data
    from sparse_adapt.lm import lm_batches

    model, tokenizer = models.load_smollm2()
    texts, _ = data.wiki_split(batch_size, 0, seed=3)
    return model, lm_batches(tokenizer, texts, batch_size, seq_len)[0]


def worker(args) -> dict:
    import sparse_adapt as sa
    from sparse_adapt.memory import SavedBytes

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    if args.random_weights:
        model, batch = random_model(args.random_weights, args.device, args.batch_size, args.seq_len)
    else:
        model, batch = real_model(args.batch_size, args.seq_len)
    sa.prune.magnitude_(model, "2:4", progress=False)
    sa.inject(model, sa.SparseLoraConfig(method=args.worker, r=args.rank, alpha=2 * args.rank))
    model.to(args.device).train()
    batch = {k: v.to(args.device) for k, v in batch.items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    compiled = torch.compile(model) if args.compiled else model

    def forward(**kw):  # under autocast with --bf16: what Trainer(bf16=True) does
        with torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=args.bf16):
            return compiled(**kw)

    def step():
        opt.zero_grad(set_to_none=True)
        forward(**batch, use_cache=False).loss.backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    step()  # warm-up (and, compiled, the compilation)
    first = time.perf_counter() - t0
    step()
    with SavedBytes([*model.parameters(), *model.buffers()]) as saved:
        loss = forward(**batch, use_cache=False).loss
    del loss
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {
        "method": args.worker, "compiled": args.compiled, "step_s": statistics.median(times), "first_step_s": first,
        "saved_bytes": saved.total,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "cuda_peak_bytes": torch.cuda.max_memory_allocated() if cuda else None,
    }


def table(rows) -> str:
    lines = ["| method | mode | step (s) | vs LoRA | saved for backward | vs LoRA | peak memory | vs LoRA |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for mode in sorted({r["compiled"] for r in rows}):
        group = [r for r in rows if r["compiled"] == mode]
        lora = next((r for r in group if r["method"] == "lora"), group[0])
        peak_key = "cuda_peak_bytes" if group[0]["cuda_peak_bytes"] is not None else "peak_rss_bytes"
        for r in group:
            lines.append(
                f"| {r['method']} | {'compiled' if mode else 'eager'} | {r['step_s']:.3f} | "
                f"{r['step_s'] / lora['step_s']:.2f}x | {r['saved_bytes'] / 2**20:.1f} MiB | "
                f"{r['saved_bytes'] / lora['saved_bytes']:.2f}x | {r[peak_key] / 2**20:.0f} MiB | "
                f"{r[peak_key] / lora[peak_key]:.2f}x |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--compile", action="store_true", help="also measure each method under torch.compile")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--json", default=None)
    p.add_argument("--bf16", action="store_true", help="train under torch.autocast(bfloat16), fp32 weights")
    p.add_argument("--random-weights", choices=sorted(ARCHS), default=None,
                   help="this architecture at random initialisation, on random token ids (no model files needed)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--compiled", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    rows = []
    for compiled in ([0, 1] if args.compile else [0]):
        for method in args.methods.split(","):
            cmd = [sys.executable, __file__, "--worker", method, "--compiled", str(compiled)] + [
                f"--{k}={v}" for k, v in (("device", args.device), ("threads", args.threads), ("rank", args.rank),
                                          ("batch-size", args.batch_size), ("seq-len", args.seq_len),
                                          ("reps", args.reps))]
            cmd += [f"--random-weights={args.random_weights}"] if args.random_weights else []
            cmd += ["--bf16"] if args.bf16 else []
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
            result = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
            if out.returncode or not result:
                sys.exit(f"{method} ({'compiled' if compiled else 'eager'}) failed:\n{out.stderr[-3000:]}")
            rows.append(json.loads(result[0][len("RESULT "):]))
            print(f"{method:8s} {'compiled' if compiled else 'eager':8s} {rows[-1]['step_s']:.3f} s/step", flush=True)
    meta = {"device": args.device, "threads": args.threads, "torch": torch.__version__, "rank": args.rank,
            "batch_size": args.batch_size, "seq_len": args.seq_len, "autocast": "bf16" if args.bf16 else None,
            "model": f"{args.random_weights} (random weights)" if args.random_weights else "smollm2-135m"}
    if args.device.startswith("cuda"):
        meta["gpu"] = torch.cuda.get_device_name(0)
    print(table(rows))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
