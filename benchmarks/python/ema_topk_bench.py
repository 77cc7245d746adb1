"""ema_topk_ at RoseLoRA's shapes: the single-matrix op and ema_topk_multi_ against what plain PyTorch would do
(the EMA, then torch.topk and a scatter per matrix), and the CPU and CUDA kernels compared entry for entry.

    python benchmarks/python/ema_topk_bench.py [--device cuda] [--rank 16] [--json out.json] [--quick]

Shapes: every adapted projection of Llama-3-8B at rank r -- lora_A (r, in) pruned per row, lora_B (out, r) per
column -- at RoseLoRA's final kept fraction (10%). On a GPU, times are CUDA-event medians; on a CPU, wall-clock
medians with one thread.
"""

import argparse
import json
import statistics
import time

import torch

import sparse_adapt as sa

# (out, in) of the projections of one Llama-3-8B layer: q, k, v, o, gate, up, down.
LLAMA3_8B_LAYER = [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096), (14336, 4096), (14336, 4096),
                   (4096, 14336)]


def adapter_matrices(layers, rank, device, dtype, seed=0):
    """(params, grads, scores, ks, dims): lora_A and lora_B of every projection, as RoseLoRA prunes them."""
    g = torch.Generator().manual_seed(seed)
    params, grads, scores, ks, dims = [], [], [], [], []
    for out_f, in_f in LLAMA3_8B_LAYER * layers:
        for shape, dim in (((rank, in_f), 1), ((out_f, rank), 0)):
            params.append(torch.randn(shape, generator=g).to(device, dtype))
            grads.append(torch.randn(shape, generator=g).to(device, dtype))
            scores.append(torch.rand(shape, generator=g).to(device))  # float32, always
            ks.append(max(1, round(0.1 * shape[dim])))
            dims.append(dim)
    return params, grads, scores, ks, dims


def torch_equivalent(param, grad, score, beta, k, dim):
    """The same step in plain PyTorch: a few kernels and a (k, other) index tensor per matrix."""
    score.mul_(beta).add_((param.float() * grad.float()).abs(), alpha=1 - beta)
    keep = torch.zeros_like(param, dtype=torch.bool).scatter_(dim, score.topk(k, dim=dim).indices, True)
    param.masked_fill_(~keep, 0)


def timed(fn, device, reps):
    """Median milliseconds of fn()."""
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--layers", type=int, default=32, help="Llama-3-8B has 32")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="2 layers, 3 reps (the dry run)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.reps = 2, 3
    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    beta = 0.85
    mats = adapter_matrices(args.layers, args.rank, args.device, dtype)
    params, grads, scores, ks, dims = mats
    rows = []

    # Single matrices of each shape: our op vs the PyTorch equivalent.
    seen = set()
    for i, (param, dim) in enumerate(zip(params, dims)):
        key = (tuple(param.shape), dim)
        if key in seen:
            continue
        seen.add(key)
        args_i = (param.clone(), grads[i], scores[i].clone(), beta, ks[i], dim)
        ours = timed(lambda a=args_i: sa.ema_topk_(*a), args.device, args.reps)
        ref = timed(lambda a=args_i: torch_equivalent(*a), args.device, args.reps)
        rows.append({"case": f"{'lora_A' if dim == 1 else 'lora_B'} {tuple(param.shape)} dim={dim} k={ks[i]}",
                     "ours_ms": ours, "torch_ms": ref})

    # Every adapter of the model at once: the multi form vs one op call per matrix vs PyTorch per matrix.
    work = [t.clone() for t in params], [t.clone() for t in scores]
    multi = timed(lambda: sa.ema_topk_multi_(work[0], grads, work[1], beta, ks, dims), args.device, args.reps)

    def loop_single():
        for i in range(len(params)):
            sa.ema_topk_(work[0][i], grads[i], work[1][i], beta, ks[i], dims[i])

    def loop_torch():
        for i in range(len(params)):
            torch_equivalent(work[0][i], grads[i], work[1][i], beta, ks[i], dims[i])

    single = timed(loop_single, args.device, max(3, args.reps // 4))
    ref = timed(loop_torch, args.device, max(3, args.reps // 4))
    rows.append({"case": f"all {len(params)} matrices ({args.layers} layers x 7 projections x A, B): multi",
                 "ours_ms": multi, "torch_ms": ref, "single_calls_ms": single})

    # CPU and CUDA must keep the same entries, bit for bit.
    identical = None
    if args.device.startswith("cuda"):
        cpu = [[t.detach().cpu().clone() for t in lst] for lst in (params, grads, scores)]
        gpu = [[t.clone() for t in lst] for lst in (params, grads, scores)]
        for lst in (cpu[2], gpu[2]):
            for s in lst:
                s.copy_(torch.round(s * 8) / 8)  # ties
        sa.ema_topk_multi_(*cpu, beta, ks, dims)
        sa.ema_topk_multi_(*gpu, beta, ks, dims)
        identical = sum(torch.equal(a, b.cpu()) and torch.equal(c, d.cpu())
                        for a, b, c, d in zip(cpu[0], gpu[0], cpu[2], gpu[2]))

    result = {"device": str(torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"),
              "torch": torch.__version__, "dtype": args.dtype, "rank": args.rank, "layers": args.layers,
              "rows": rows, "cpu_cuda_identical": identical, "matrices": len(params)}
    print(f"ema_topk_ on {result['device']}, {args.dtype}, r={args.rank}, torch {torch.__version__}")
    print("| case | ema_topk_ ms | PyTorch (EMA + topk + scatter) ms | speed-up |")
    print("|---|---:|---:|---:|")
    for r in rows:
        extra = f" (one ema_topk_ call per matrix: {r['single_calls_ms']:.3f} ms)" if "single_calls_ms" in r else ""
        speedup = r["torch_ms"] / r["ours_ms"]
        print(f"| {r['case']}{extra} | {r['ours_ms']:.3f} | {r['torch_ms']:.3f} | {speedup:.1f}x |")
    if identical is not None:
        print(f"CPU and CUDA kept the same entries and scores on {identical} of {len(params)} matrices")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0 if identical in (None, len(params)) else 1


if __name__ == "__main__":
    raise SystemExit(main())
