"""First measurement of the native core: one adapted linear layer, LoRS vs plain LoRA vs SQFT.

For each layer shape: bytes saved for backward (activations only: tensors other than the layer's own weight,
adapters and mask, counted exactly with saved_tensors_hooks) and median forward+backward time, as ratios to
plain LoRA measured in the same run; and the fused merge against the naive PyTorch expression.

    python benchmarks/python/first_measurement.py [--threads 1] [--device cpu|cuda] [--out benchmarks/results]

This is a benchmark, not a test: it asserts nothing about speed.
"""

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from report import describe_machine  # same folder

import sparse_adapt as sa
from sparse_adapt.memory import SavedBytes

CPU_SHAPES = [(2048, 2048), (4096, 1024)]      # (out, in)
GPU_SHAPES = [(14336, 4096), (4096, 14336), (4096, 4096)]  # Llama-3-8B MLP / attention


def lora(x, w, a, b, s, mask):
    return F.linear(x, w) + s * F.linear(F.linear(x, a), b)


def sqft(x, w, a, b, s, mask):
    # SQFT: autograd through the masked merge; keeps the merged (out, in) weight alive for backward.
    return F.linear(x, w + s * (b @ a) * mask)


def lors(x, w, a, b, s, mask):
    return sa.masked_lora_linear(x, w, None, a, b, s)


METHODS = {"lora": lora, "sqft": sqft, "lors": lors}


def saved_activation_bytes(fn, x, w, a, b, s, mask):
    """Bytes saved for backward other than the layer's own weight, adapters and mask (its activations)."""
    with SavedBytes([w, a, b, mask]) as saved:
        fn(x, w, a, b, s, mask)
    return saved.total


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_time(step, device, warmup, reps):
    for _ in range(warmup):
        step()
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def layer_operands(out, in_, r, tokens, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, in_, generator=g) * (torch.rand(out, in_, generator=g) >= 0.5)
    a = torch.randn(r, in_, generator=g) / r ** 0.5
    b = torch.randn(out, r, generator=g) / r ** 0.5
    x = torch.randn(tokens, in_, generator=g)
    w, a, b, x = (t.to(device, dtype) for t in (w, a, b, x))
    return x.requires_grad_(), w, a.requires_grad_(), b.requires_grad_(), (w != 0)


def measure_layer(out, in_, r, tokens, device, dtype, warmup, reps):
    x, w, a, b, mask = layer_operands(out, in_, r, tokens, device, dtype)
    s = 2.0
    rows = {}
    for name, fn in METHODS.items():
        def step(fn=fn):
            y = fn(x, w, a, b, s, mask)
            torch.autograd.grad(y, (x, a, b), torch.ones_like(y))
        rows[name] = dict(saved=saved_activation_bytes(fn, x, w, a, b, s, mask),
                          time=median_time(step, device, warmup, reps))
    with torch.no_grad():
        naive = median_time(lambda: w + s * (b @ a) * (w != 0), device, warmup, reps)
        fused = median_time(lambda: sa.masked_merge(w, a, b, s), device, warmup, reps)
    return rows, naive, fused


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="float32 on CPU, bfloat16 on CUDA by default")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--tokens", type=int, default=None, help="512 on CPU, 2048 on CUDA by default")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    cuda = args.device.startswith("cuda")
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    tokens = args.tokens or (2048 if cuda else 512)
    reps = args.reps or (50 if cuda else 9)
    shapes = GPU_SHAPES if cuda else CPU_SHAPES

    machine = describe_machine(args.device)
    header = (f"Machine: {machine} ({args.device}, {args.threads} thread(s)), torch {torch.__version__}, {dtype}, "
              f"r={args.rank}, {tokens} tokens, 50% unstructured sparsity; median of {reps}.")
    lines = [header, "",
             "| layer (out x in) | method | saved for backward | vs LoRA | fwd+bwd ms | vs LoRA | vs SQFT |",
             "|---|---|---:|---:|---:|---:|---:|"]
    merge_lines = ["", "| layer (out x in) | naive `W + s(B@A)*(W!=0)` ms | `masked_merge` ms | speed-up |",
                   "|---|---:|---:|---:|"]
    for out, in_ in shapes:
        rows, naive, fused = measure_layer(out, in_, args.rank, tokens, args.device, dtype, 2, reps)
        lora_row, sqft_row = rows["lora"], rows["sqft"]
        for name, row in rows.items():
            lines.append(
                f"| {out}x{in_} | {name} | {row['saved'] / 2**20:.2f} MiB | {row['saved'] / lora_row['saved']:.2f}x | "
                f"{row['time'] * 1e3:.1f} | {row['time'] / lora_row['time']:.2f}x | "
                f"{row['time'] / sqft_row['time']:.2f}x |")
        merge_lines.append(f"| {out}x{in_} | {naive * 1e3:.2f} | {fused * 1e3:.2f} | {naive / fused:.2f}x |")
    text = "\n".join(lines + merge_lines) + "\n"
    print(text)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() else "-" for c in f"{machine}-{args.device}-{args.threads}t").strip("-")
    path = out_dir / f"first-measurement-{slug}.md"
    path.write_text("# First measurement: one adapted layer\n\n" + text)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
