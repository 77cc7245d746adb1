"""The command line: ``sparse-adapt demo`` and ``sparse-adapt edit`` (also ``python -m sparse_adapt ...``)."""

import argparse
import math
import sys
from typing import List, Optional

from .adapters import get_method, method_names


def _demo(args) -> int:
    from . import demo

    _check_writable_dir(args.out)
    common = dict(threads=args.threads, device=args.device, out_dir=args.out, sparsity=args.sparsity,
                  pruner=args.pruner, seed=args.seed, progress=not args.no_progress,
                  save_merged=not args.no_save_model)
    for name in ("steps", "layers", "lr", "r"):
        if getattr(args, name) is not None:
            common[name] = getattr(args, name)
    methods = [args.method] + [m for m in ("lora", "sqft", "spp") if m != args.method] if args.compare \
        else [args.method]
    settings = (demo.DemoSettings.quick if args.quick else demo.DemoSettings)(methods=methods, **common)
    result = demo.run_demo(settings)
    from . import distributed

    rank = distributed.rank()
    if distributed.world_size() > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    if rank != 0:  # launched by torchrun / accelerate launch: rank 0 reports
        return 0
    out = demo.write_outputs(result)
    print(demo.render_report(result))
    print(f"report: {out / 'report.md'}   plot: {out / 'perplexity.png'}")
    failed = [m.method for m in result.methods if get_method(m.method).preserves_sparsity and not m.keeps_zeros]
    if failed:
        print(f"ERROR: merged weights lost the pruned zero pattern: {failed}", file=sys.stderr)
        return 1
    return 0


def _read_edits(path: str):
    """The edits of a file, every one checked before anything runs: JSONL (one object per line: prompt, target and
    optionally subject, rephrasings, portability as [{"prompt", "answer"}], neighbors, and locality -- prompts
    whose continuations must not change), or EasyEdit's JSON (a list of objects: prompt, subject, target_new,
    rephrase_prompt, locality_prompt / locality_ground_truth, portability)."""
    import json

    from .edit import Edit

    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise SystemExit(f"{path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise SystemExit(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if text.lstrip().startswith("["):  # EasyEdit: one JSON list
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise SystemExit(f"{path}: not valid JSON: {e}") from None
        entries = [(f"{path}[{i}]", d) for i, d in enumerate(records)]
    else:
        entries = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    entries.append((f"{path}:{n}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise SystemExit(f"{path}:{n}: {e}") from None
    edits, locality = [], []
    for where, d in entries:
        try:
            if not isinstance(d, dict):
                raise ValueError(f"each edit must be a JSON object, got {type(d).__name__}")
            edits.append(Edit.from_dict(d))
            if not isinstance(d.get("locality"), dict):  # EasyEdit's locality dict holds neighbours, read above
                locality += _string_list(d.get("locality", []), "locality")
        except (ValueError, TypeError, KeyError) as e:
            raise SystemExit(f"{where}: {e}") from None
    if not edits:
        raise SystemExit(f"{path}: no edits")
    return edits, locality


def _string_list(value, name: str) -> List[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ValueError(f"{name} must be a list of non-empty strings, got {value!r}")
    return value


def _edit(args) -> int:
    import torch

    from .adapters import merge, save_adapter
    from .assets import models
    from .edit import EditConfig, apply_edits, results_table

    edits, locality = _read_edits(args.edits)
    if args.out:
        _check_writable_file(args.out)
    if args.save_adapter:
        _check_writable_dir(args.save_adapter)
    torch.set_num_threads(args.threads)
    model, tokenizer = models.load_smollm2()
    # With --save-adapter the adapter is saved unmerged first, and merged after (--merge).
    if args.save_adapter and len(edits) > 1 and not args.together:
        raise SystemExit(f"--save-adapter saves one adapter, but the {len(edits)} edits of {args.edits} are made one "
                         f"after another, each merged before the next; add --together to train them as one adapter")
    config = EditConfig(method=args.method, steps=args.steps, extra_steps=args.extra_steps,
                        merge=args.merge and not args.save_adapter, group_size=None if args.together else 1,
                        neighbor_rephrasings=args.hold_rephrasings, subject_update=args.subject_update,
                        after=args.after)
    model, m = apply_edits(model.to(args.device), tokenizer, edits, config, locality)
    text = results_table([m]) + "\n\n" + "\n".join(
        f"- {e['prompt']!r} -> {e['target']!r}: token accuracy {e['token_accuracy']:.2f}; generates {e['generation']!r}"
        for e in m.per_edit) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
    if args.save_adapter:
        save_adapter(model, args.save_adapter)
        print(f"adapter saved to {args.save_adapter}")
        if args.merge:
            merge(model)
    return 0


# ---------------------------------------------------------------------------------------- argument checking


def _int_at_least(minimum: int):
    what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def _sparsity(text: str):
    """'N:M' stays a string; anything else must be a fraction in [0, 1)."""
    from .prune import parse_sparsity

    value = text if ":" in text else None
    if value is None:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected 'N:M' or a fraction in [0, 1), got {text!r}") from None
    try:
        parse_sparsity(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def _check_writable_dir(path: str) -> None:
    """Create the directory and write a file in it now, so that an unusable output path fails before the run."""
    import os
    import tempfile

    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as e:
        raise SystemExit(f"sparse-adapt: cannot write to {path!r}: {e.strerror or e}") from None


def _check_writable_file(path: str) -> None:
    import os

    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise SystemExit(f"sparse-adapt: {path!r} is a directory; --out takes a file name")
    _check_writable_dir(parent)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparse-adapt", description="Sparse low-rank adaptation (LoRS, RoseLoRA).")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="prune SmolLM2-135M, recover it with LoRS, check the merged sparsity",
                          description="Dense perplexity -> prune -> fine-tune with LoRS (gradient-SVD init) -> "
                                      "merge -> verify every merged weight keeps the pruned zeros.")
    demo.add_argument("--quick", action="store_true",
                      help="8 steps of 64-token sequences, 16 held-out texts (minutes on a CPU); with --layers n, "
                           "only the first n decoder layers")
    demo.add_argument("--compare", action="store_true", help="also run lora, sqft and spp with the same budget")
    demo.add_argument("--method", default="lors", choices=method_names())
    demo.add_argument("--sparsity", default="2:4", type=_sparsity, help="'N:M' or a fraction (default 2:4)")
    demo.add_argument("--pruner", default="wanda", choices=("wanda", "magnitude"))
    demo.add_argument("--steps", type=_positive_int)
    demo.add_argument("--layers", type=_positive_int, help="keep only the first n decoder layers")
    demo.add_argument("--lr", type=_positive_float)
    demo.add_argument("--r", type=_positive_int)
    demo.add_argument("--threads", type=_positive_int, default=2)
    demo.add_argument("--device", default="cpu")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default="out/demo", help="directory for report.md, results.json, perplexity.png")
    demo.add_argument("--no-progress", action="store_true")
    demo.add_argument("--no-save-model", action="store_true",
                      help="do not write the merged model as a compressed-tensors 2:4 checkpoint (OUT/merged-2of4)")
    demo.set_defaults(run=_demo)

    from .edit.editing import AFTER_CONTEXTS, EDIT_METHODS, EditConfig

    ed = sub.add_parser("edit", help="edit facts of SmolLM2-135M with RoseLoRA (or LoRA / FT-L) and measure them",
                        description="Apply the edits of a JSONL file and report edit success, "
                                    "generalization, locality, portability, fluency and weights changed.")
    ed.add_argument("--edits", required=True,
                    help="JSONL (prompt, target[, subject, rephrasings, portability, neighbors, locality]) or "
                         "EasyEdit's JSON list (prompt, subject, target_new, rephrase_prompt, locality_prompt/"
                         "locality_ground_truth, portability)")
    ed.add_argument("--method", default="roselora", choices=EDIT_METHODS)
    ed.add_argument("--steps", type=_positive_int, default=EditConfig.steps)
    ed.add_argument("--extra-steps", type=_non_negative_int, default=EditConfig.extra_steps,
                    help="an edit that has not held after --steps trains up to this many more (default: %(default)s)")
    ed.add_argument("--hold-rephrasings", action="store_true",
                    help="hold the neighbour prompts in each edit's rephrasings too, not only in its prompt's form: "
                         "the relation stays in place in those words, at a cost in generalization")
    ed.add_argument("--subject-update", action="store_true",
                    help="train the update at the subject's last token in the prompt's copies behind generic "
                         "prefixes: the relation holds under other phrasings, at a cost in generalization")
    ed.add_argument("--after", default=EditConfig.after, choices=AFTER_CONTEXTS,
                    help="what the tokens after the new answer are held to: what the unedited model said after its "
                         "own answer, or after the new one (default: %(default)s)")
    ed.add_argument("--merge", action="store_true", help="fold the adapter into the weights")
    ed.add_argument("--together", action="store_true",
                    help="train all edits as one batch into one adapter (default: one edit after another, each "
                         "merged and held in place while the later ones are made)")
    ed.add_argument("--save-adapter", help="directory to save the (unmerged) adapter to (roselora, lora; one edit, "
                                           "or several with --together)")
    ed.add_argument("--out", help="write the results table here (Markdown)")
    ed.add_argument("--threads", type=_positive_int, default=2)
    ed.add_argument("--device", default="cpu")
    ed.set_defaults(run=_edit)
    ed.set_defaults(check=_check_edit_args)
    return parser


def _check_edit_args(parser: argparse.ArgumentParser, args) -> None:
    if args.save_adapter and args.method == "ft-l":
        parser.error("--save-adapter needs an adapter method (roselora, lora); ft-l changes a weight directly")


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check = getattr(args, "check", None)
    if check is not None:
        check(parser, args)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
