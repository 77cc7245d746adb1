"""Exact activation memory of one training step of Llama-3-8B and Llama-3-70B, for every method, without a GPU
and without weights: the model is built on the meta device from its config alone, the adapters injected, one
forward run on meta tensors under sparse_adapt.memory.SavedBytes, which counts the bytes autograd saves for backward
(each storage once, parameters and buffers excluded).

    python benchmarks/python/memory_at_scale.py [--models 8b,70b] [--tokens 2048] [--batch 1] [--rank 16]
                                                [--out benchmarks/results]

Everything is bf16, as these models are trained. Attention saves what FlashAttention-2 saves (q, k, v, the output
and a float32 log-sum-exp per row), through a stand-in attention function: on the meta device PyTorch would pick
the math kernel, which keeps the whole attention matrix and is not what anyone trains with. No activation
checkpointing of the layers (per-method checkpointing -- SQFT-gc, SPP-gc -- is part of those methods).
"""

import argparse
import json
import time
from pathlib import Path

import torch

import sparse_adapt as sa
from sparse_adapt.memory import SavedBytes

# From the models' published config.json files.
CONFIGS = {
    "8b": dict(name="Llama-3-8B", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    "70b": dict(name="Llama-3-70B", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                num_attention_heads=64, num_key_value_heads=8, vocab_size=128256),
    # A tiny one, small enough to also run on real tensors (tests/test_memory_at_scale.py checks they agree).
    "tiny": dict(name="tiny Llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=96),
}
METHODS = list(sa.method_names())


class _FlashLike(torch.autograd.Function):
    """Attention whose forward saves exactly FlashAttention-2's tensors; its values are never used (meta)."""

    @staticmethod
    def forward(ctx, q, k, v):  # (B, H, L, D), (B, KVH, L, D), (B, KVH, L, D)
        out = torch.empty_like(q)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)  # (B, H, L)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def flash_like_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    return _FlashLike.apply(query, key, value).transpose(1, 2).contiguous(), None


def build(spec, method, rank, dtype, device="meta"):
    from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM

    AttentionInterface.register("sa_fa2_saved_set", flash_like_attention)
    fields = {k: v for k, v in spec.items() if k != "name"}
    config = LlamaConfig(**fields, max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False)
    config._attn_implementation = "sa_fa2_saved_set"
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    if device != "meta":  # real weights: prune them 2:4, so the sparsity-preserving methods have zeros
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, torch.nn.Linear):
                    m.weight.view(-1, 4)[:, :2] = 0
    return sa.inject(model, sa.config_for(method, r=rank, alpha=2 * rank, target_modules="all-linear"))


def saved_bytes(spec, method, rank, batch, tokens, dtype, device="meta"):
    model = build(spec, method, rank, dtype, device).train()
    ids = torch.zeros(batch, tokens, dtype=torch.long, device=device)
    with SavedBytes([*model.parameters(), *model.buffers()]) as saved:
        model(input_ids=ids, labels=ids, use_cache=False)  # forward only: what it saves is what backward needs
    return saved.total, sum(p.numel() for p in model.parameters() if p.requires_grad)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="8b,70b")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    rows = []
    for key in args.models.split(","):
        spec = CONFIGS[key]
        base = None
        for method in args.methods.split(","):
            t0 = time.perf_counter()
            total, trainable = saved_bytes(spec, method, args.rank, args.batch, args.tokens, torch.bfloat16)
            base = total if method == "lora" else base
            rows.append({"model": spec["name"], "method": method, "saved_bytes": total, "trainable": trainable,
                         "vs_lora": total / base if base else None})
            print(f"{spec['name']:<11} {method:<9} {total / 2**30:8.2f} GiB saved for backward "
                  f"({rows[-1]['vs_lora'] or 1:.2f}x LoRA), {trainable / 1e6:.1f}M trainable "
                  f"[{time.perf_counter() - t0:.1f} s]", flush=True)
    lines = [
        "# Activation memory at real scale",
        "",
        f"Bytes saved for backward by one training step, counted exactly on the meta device from each model's config "
        f"(`benchmarks/python/memory_at_scale.py`; no weights, no GPU): bf16, batch {args.batch} x {args.tokens} "
        f"tokens, every projection adapted (r = {args.rank}), FlashAttention-2's saved set for attention, no "
        f"layer checkpointing. torch {torch.__version__}.",
        "",
        "| model | method | saved for backward | vs LoRA | over LoRA |",
        "|---|---|---:|---:|---:|",
    ]
    for r in rows:
        lora = next(x for x in rows if x["model"] == r["model"] and x["method"] == "lora")
        lines.append(f"| {r['model']} | {r['method']} | {r['saved_bytes'] / 2**30:.2f} GiB | {r['vs_lora']:.2f}x | "
                     f"{(r['saved_bytes'] - lora['saved_bytes']) / 2**30:+.2f} GiB |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory-at-scale.md").write_text(text)
    (out / "memory-at-scale.json").write_text(json.dumps({"rows": rows, "tokens": args.tokens, "batch": args.batch,
                                                          "rank": args.rank, "torch": torch.__version__}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
