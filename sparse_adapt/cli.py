"""The command line: ``sparse-adapt demo`` (also ``python -m sparse_adapt demo``)."""

import argparse
import sys
from typing import List, Optional

from .adapters.config import METHODS, SPARSITY_PRESERVING


def _demo(args) -> int:
    from . import pipeline

    common = dict(threads=args.threads, device=args.device, out_dir=args.out, sparsity=args.sparsity,
                  pruner=args.pruner, seed=args.seed, progress=not args.no_progress)
    for name in ("steps", "layers", "lr", "r"):
        if getattr(args, name) is not None:
            common[name] = getattr(args, name)
    methods = [args.method] + [m for m in ("lora", "sqft", "spp") if m != args.method] if args.compare \
        else [args.method]
    settings = (pipeline.DemoSettings.quick if args.quick else pipeline.DemoSettings)(methods=methods, **common)
    result = pipeline.run_demo(settings)
    out = pipeline.write_outputs(result)
    print(pipeline.render_report(result))
    print(f"report: {out / 'report.md'}   plot: {out / 'perplexity.png'}")
    failed = [m.method for m in result.methods if m.method in SPARSITY_PRESERVING and not m.keeps_zeros]
    if failed:
        print(f"ERROR: merged weights lost the pruned zero pattern: {failed}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparse-adapt", description="Sparse low-rank adaptation (LoRS, RoseLoRA).")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="prune SmolLM2-135M, recover it with LoRS, check the merged sparsity",
                          description="Dense perplexity -> prune -> fine-tune with LoRS (gradient-SVD init) -> "
                                      "merge -> verify every merged weight keeps the pruned zeros.")
    demo.add_argument("--quick", action="store_true", help="4 layers, short sequences, 8 steps (minutes on a CPU)")
    demo.add_argument("--compare", action="store_true", help="also run lora, sqft and spp with the same budget")
    demo.add_argument("--method", default="lors", choices=METHODS)
    demo.add_argument("--sparsity", default="2:4", help="'N:M' or a fraction (default 2:4)")
    demo.add_argument("--pruner", default="wanda", choices=("wanda", "magnitude"))
    demo.add_argument("--steps", type=int)
    demo.add_argument("--layers", type=int, help="keep only the first n decoder layers")
    demo.add_argument("--lr", type=float)
    demo.add_argument("--r", type=int)
    demo.add_argument("--threads", type=int, default=2)
    demo.add_argument("--device", default="cpu")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default="out/demo", help="directory for report.md, results.json, perplexity.png")
    demo.add_argument("--no-progress", action="store_true")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
