"""Everything that needs a GPU, in one call (`make gpu-check`), written for a machine like the ones lent here: one
GPU, many cores, torch with CUDA installed, no network, this repository copied in, a few minutes.

Steps (each with its own time limit; a failure is recorded and the next step still runs):
  1. build   the extension for the present GPU's arch only, with every core, and in parallel the C++ tests and
             benchmarks (CMake, CUDA on); then --smoke: an error message with an integer in it must raise, not crash
             (an extension built by a compiler whose libstdc++ is not the one the process loads -- the GPU machines'
             /opt/gcc, 2026-11-27 -- segfaulted there); if it crashes, the extension is rebuilt with /usr/bin/g++
  2. tests   every CUDA test (pytest -m cuda) of the op-level suites, and every case of the error tests
  3. sanitizer  compute-sanitizer memcheck and racecheck over the C++ op tests on CUDA (when the tool exists)
  4. layer   the C++ layer benchmark on CUDA in bf16 at Llama-3-8B shapes, 2048 tokens, r = 16 and 64, every
             method; merge bandwidth against a copy of the same bytes
  5. topk    ema_topk_ and ema_topk_multi_ against torch.topk at RoseLoRA's shapes; CPU vs CUDA identity
  6. static  what the kernels compiled to for this arch (registers, spills, load/store widths)
  7. models  the user's path on the GPU: every CUDA test of the model-level suites -- every method injected,
             trained, merged, saved and reloaded; bf16; RoseLoRA's pruner; transformers.Trainer(bf16=True); PEFT;
             gradient-SVD init; Wanda; torch.compile; knowledge editing
  8. model-step  a whole-model training step per method under bf16 autocast, Llama-3.2-1B's shapes at random
             initialisation (no model files travel), 4 x 512 tokens: time, bytes saved for backward, peak memory
(7 and 8 come last: they cannot cut the steps above short)
and a summary (Markdown and JSON) that checks the goals: merge >= 85% of copy bandwidth, LoRS fwd+bwd <= 1.10x LoRA
at 14336x4096 with 2048 tokens, SPP-gc >= 1.5x LoRS, LoRS's saved bytes = LoRA's, CPU and CUDA ema_topk_ identical.

    python3 scripts/gpu_check.py [--out DIR] [--dry-run]

Results go to $OUT when set, else --out (default benchmarks/results/gpu-check). --dry-run prints the plan and runs
what a CPU can (tests/test_gpu_check.py runs it, so the script cannot rot).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
OP_TESTS = ["tests/test_masked_merge.py", "tests/test_masked_lora_linear.py", "tests/test_ema_topk.py",
            "tests/test_autocast.py", "tests/test_compile.py", "tests/test_errors.py"]
# test_autocast's CUDA cases include Trainer(bf16=True) on a tiny Llama: run with the op suites, as before.
MODEL_TESTS = ["tests/test_adapters.py", "tests/test_roselora.py", "tests/test_peft.py", "tests/test_inject.py",
               "tests/test_prune.py", "tests/test_edit_precision.py"]
BUDGET_S = 540  # the whole check, build included; each step gets at most its own limit and what is left
GOALS = {
    "merge_of_copy": 0.85,          # merge bandwidth >= 85% of a copy of the same bytes
    "lors_vs_lora": 1.10,           # LoRS fwd+bwd <= 1.10x LoRA, 14336x4096, 2048 tokens
    "sppgc_vs_lors": 1.5,           # SPP-gc >= 1.5x LoRS time
}


class Step:
    def __init__(self, name, what, commands, timeout, dry_commands=None):
        self.name, self.what, self.commands, self.timeout = name, what, commands, timeout
        self.dry_commands = dry_commands  # what a CPU can run in --dry-run (None: nothing)
        self.status, self.seconds, self.log = "not run", 0.0, ""


def gpu_info():
    import torch

    if not torch.cuda.is_available():
        return {"available": False, "torch": torch.__version__, "cuda": torch.version.cuda}
    p = torch.cuda.get_device_properties(0)
    return {"available": True, "torch": torch.__version__, "cuda": torch.version.cuda, "name": p.name,
            "capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count,
            "memory_gib": round(p.total_memory / 2**30, 1)}


def sanitizer():
    for c in (shutil.which("compute-sanitizer"), "/usr/local/cuda/bin/compute-sanitizer",
              "/usr/local/cuda/compute-sanitizer/compute-sanitizer"):
        if c and os.path.exists(c):
            return c
    return None


def xdist_workers():
    try:
        import xdist  # noqa: F401  (pytest-xdist: the CUDA tests in parallel processes, one GPU)
    except ImportError:
        return ""
    return "-n 6 "


def cuda_tests(files, collect_only=False):
    """The pytest command that runs (or, for a dry run, only collects) every CUDA case of `files`."""
    how = "--collect-only " if collect_only else xdist_workers()
    return f"{PY} -m pytest -q -m cuda {how}-p no:cacheprovider " + " ".join(files)


def plan(out, arch, jobs):
    build_env = f"TORCH_CUDA_ARCH_LIST={arch} SPARSE_ADAPT_CUDA=1"
    cpp = ROOT / "build" / "gpu-cpp"  # not under out: only a few result files travel back
    layer_json, topk_json = out / "layer.json", out / "topk.json"
    san = sanitizer()
    cpp_tests = f"{cpp}/sparse_adapt_cpp_tests --device cuda"
    sanitizer_cmds = ([f"{san} --tool memcheck --error-exitcode 1 {cpp_tests}",
                       f"{san} --tool racecheck --error-exitcode 1 {cpp_tests}"] if san else [])
    build_ext = f"{build_env} MAX_JOBS={max(1, jobs // 2)} {PY} setup.py -q build_ext --inplace"
    smoke = f"{PY} {Path(__file__).resolve()} --smoke"
    system_cxx = "CC=/usr/bin/gcc CXX=/usr/bin/g++"
    return [
        Step("build", f"the extension for sm_{arch.replace('.', '')} only, and the CMake C++ side, side by side "
             f"({jobs} jobs); the error path's smoke test",
             ['cxx=${CXX:-c++}; echo "C++ compiler: $cxx: $($cxx --version | head -n 1); libstdc++ it links: '
              '$($cxx -print-file-name=libstdc++.so)"',
              f"({build_ext}) & a=$!; "
              f"({build_env} SPARSE_ADAPT_CPP_CUDA=1 CPP_TESTS=0 MAX_JOBS={max(1, jobs // 2)} PYTHON={PY} "
              f"CMAKE_EXTRA=-DSPARSE_ADAPT_SANITIZED_TESTS=OFF scripts/cmake-build.sh {cpp}) & b=$!; "
              f"wait $a; ra=$?; wait $b; rb=$?; exit $((ra || rb))",
              f"{smoke} || {{ echo 'smoke test failed: rebuilding the extension with /usr/bin/g++'; "
              f"test -x /usr/bin/g++ && {system_cxx} {build_ext} --force && {smoke}; }}",
              f"{PY} -c 'import sparse_adapt as sa; assert sa.has_cuda_kernels(), \"no CUDA kernels\"'"],
             timeout=300),
        Step("tests", "every CUDA test of the op suites; every error test",
             [cuda_tests(OP_TESTS), f"{PY} -m pytest -q -p no:cacheprovider tests/test_errors.py"], timeout=200,
             dry_commands=[cuda_tests(OP_TESTS, collect_only=True)]),
        Step("sanitizer", "compute-sanitizer memcheck + racecheck over the C++ op tests on CUDA"
             + ("" if san else " -- compute-sanitizer not found on this machine"), sanitizer_cmds, timeout=120),
        Step("layer", "bench_layer: bf16, Llama-3-8B shapes, 2048 tokens, r = 16, 64, every method; merge bandwidth",
             [f"{cpp}/bench_layer --device cuda --tokens 2048 --ranks 16,64 --reps 10 --json {layer_json}"],
             timeout=150, dry_commands=[f"{ROOT}/build/cmake/bench_layer --quick --reps 1 --json {layer_json}"]),
        Step("topk", "ema_topk_ / ema_topk_multi_ vs torch.topk at Llama-3-8B r=16; CPU == CUDA",
             [f"{PY} benchmarks/python/ema_topk_bench.py --device cuda --json {topk_json}"], timeout=90,
             dry_commands=[f"{PY} benchmarks/python/ema_topk_bench.py --device cpu --quick --json {topk_json}"]),
        Step("static", "cuobjdump: registers, spills, load/store widths for this arch",
             [f"{PY} benchmarks/cuda_static.py --out {out}"], timeout=60,
             dry_commands=[f"{PY} benchmarks/cuda_static.py --out {out}"]),
        Step("models", "every CUDA test of the model-level suites: adapters, RoseLoRA, Trainer, PEFT, init, "
             "pruning, compile, editing",
             [cuda_tests(MODEL_TESTS)], timeout=240, dry_commands=[cuda_tests(MODEL_TESTS, collect_only=True)]),
        Step("model-step", "model_step.py: every method, whole model, bf16 autocast, Llama-3.2-1B shapes (random "
             "weights), 4 x 512 tokens, r = 16",
             [f"{PY} benchmarks/python/model_step.py --device cuda --random-weights llama3.2-1b --bf16 --batch-size 4 "
              f"--seq-len 512 --reps 5 --json {out / 'model.json'}"], timeout=150),
    ]


def smoke_test():
    """An op's error message with integers in it (k's range) must raise ValueError. Formatting an integer into a
    message is where an extension linked against another libstdc++ than the process's crashes (seen: segfault)."""
    import torch

    import sparse_adapt as sa

    try:
        sa.ema_topk_(torch.ones(2, 3), torch.ones(2, 3), torch.zeros(2, 3), 0.5, 7, 1)
    except ValueError as e:
        assert "k must be in [0, 3]" in str(e), e
        print("smoke test: the error path formats integers")
        return 0
    raise SystemExit("smoke test: k=7 > 3 was not refused")


def run_step(step, commands, env, log, deadline):
    t0 = time.time()
    step.timeout = int(min(step.timeout, deadline - t0))
    if step.timeout < 10:
        step.status = "skipped: the time budget is spent"
        return
    step.status = "ok"
    for cmd in commands:
        log.write(f"\n===== {step.name}: {cmd}\n")
        log.flush()
        try:
            left = max(1, step.timeout - (time.time() - t0))
            proc = subprocess.run(["bash", "-c", cmd], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, timeout=left)
            step.log += proc.stdout
            log.write(proc.stdout)
            if proc.returncode != 0:
                step.status = f"failed (exit {proc.returncode})"
                break
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            step.log += out
            log.write(out)
            step.status = f"timed out after {step.timeout} s"
            break
    step.seconds = time.time() - t0
    print(f"[{step.name}] {step.status} in {step.seconds:.0f} s", flush=True)


def goals(out):
    """The issue's goals, from the benchmark JSON files: (name, value, target, verdict)."""
    rows = []
    layer, topk = out / "layer.json", out / "topk.json"
    if layer.exists():
        data = json.loads(layer.read_text())
        merge = [m for m in data.get("merge", []) if m.get("from") == m.get("to")]
        if merge:
            worst = min(m["gbs"] / m["copy_gbs"] for m in merge)
            rows.append(("merge bandwidth / copy (worst shape and rank)", f"{worst:.2f}",
                         f">= {GOALS['merge_of_copy']}", worst >= GOALS["merge_of_copy"]))
        by = {(r["out"], r["in"], r["tokens"], r["rank"], r["method"]): r for r in data.get("layers", [])}
        for (o, i, t, r, m), row in sorted(by.items()):
            if m != "lors" or (o, i, t) != (14336, 4096, 2048):
                continue
            lora, sppgc = by.get((o, i, t, r, "lora")), by.get((o, i, t, r, "spp_gc"))
            ratio = row["ms"] / lora["ms"]
            rows.append((f"LoRS / LoRA time, 14336x4096, 2048 tokens, r={r}", f"{ratio:.2f}",
                         f"<= {GOALS['lors_vs_lora']}", ratio <= GOALS["lors_vs_lora"]))
            rows.append((f"SPP-gc / LoRS time, r={r}", f"{sppgc['ms'] / row['ms']:.2f}", f">= {GOALS['sppgc_vs_lors']}",
                         sppgc["ms"] / row["ms"] >= GOALS["sppgc_vs_lors"]))
            rows.append((f"LoRS saved bytes / LoRA's, r={r}", f"{row['saved'] / max(lora['saved'], 1):.3f}",
                         "<= 1.0", row["saved"] <= lora["saved"]))
    if topk.exists():
        data = json.loads(topk.read_text())
        if data.get("cpu_cuda_identical") is not None:
            rows.append(("ema_topk_: matrices CPU == CUDA", f"{data['cpu_cuda_identical']} / {data['matrices']}",
                         "all", data["cpu_cuda_identical"] == data["matrices"]))
    return rows


def write_summary(out, info, steps, dry_run):
    verdicts = [] if dry_run else goals(out)  # a dry run's numbers are a CPU's: no verdict on the GPU goals
    lines = [f"# GPU check{' (dry run: the plan, and what a CPU can run)' if dry_run else ''}", "",
             f"Device: {info.get('name', 'no GPU')} (compute capability {info.get('capability', '-')}, "
             f"{info.get('sms', '-')} SMs, {info.get('memory_gib', '-')} GiB); torch {info['torch']}, CUDA "
             f"{info['cuda']}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", "",
             "| step | what | status | seconds |", "|---|---|---|---:|"]
    for s in steps:
        lines.append(f"| {s.name} | {s.what} | {s.status} | {s.seconds:.0f} |")
    if verdicts:
        lines += ["", "| goal | measured | target | met |", "|---|---:|---|---|"]
        lines += [f"| {n} | {v} | {t} | {'yes' if ok else '**no**'} |" for n, v, t, ok in verdicts]
    for s in steps:
        if s.name == "static":
            continue  # its own file, cuda-static.md
        tables = [ln for ln in s.log.splitlines() if ln.startswith("|") or "passed" in ln or "ERROR SUMMARY" in ln
                  or "identical" in ln or ln.startswith("ema_topk_ on")]
        if tables:
            lines += ["", f"## {s.name}", "", *tables]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps({
        "device": info, "dry_run": dry_run,
        "steps": [{"name": s.name, "what": s.what, "status": s.status, "seconds": round(s.seconds, 1)} for s in steps],
        "goals": [{"goal": n, "measured": v, "target": t, "met": ok} for n, v, t, ok in verdicts]}, indent=1) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "benchmarks" / "results" / "gpu-check"))
    p.add_argument("--dry-run", action="store_true", help="print the plan; run only what a CPU can")
    p.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for all the steps together")
    p.add_argument("--smoke", action="store_true", help="only the built extension's error-path smoke test")
    args = p.parse_args(argv)
    if args.smoke:
        return smoke_test()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    info = gpu_info()
    if not info["available"] and not args.dry_run:
        raise SystemExit("no CUDA GPU visible; use --dry-run to see the plan")
    arch = info.get("capability", "9.0")
    jobs = os.cpu_count() or 2
    steps = plan(out, arch, jobs)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONUNBUFFERED="1", SPARSE_ADAPT_CUDA="1")
    print(f"GPU check: {info.get('name', 'no GPU (dry run)')}, arch {arch}, {jobs} cores, results in {out}")
    deadline = time.time() + args.budget
    with open(out / "log.txt", "w") as log:
        for step in steps:
            commands = step.dry_commands if args.dry_run else step.commands
            print(f"[{step.name}] {step.what}")
            for c in step.commands:
                print(f"    $ {c}")
            if args.dry_run:
                if commands is None:
                    step.status = "needs a GPU"
                    continue
                print("    (dry run) " + "; ".join(commands))
            if not commands:
                step.status = "skipped: " + ("compute-sanitizer not found" if step.name == "sanitizer" else "-")
                continue
            run_step(step, commands, env, log, deadline)
            write_summary(out, info, steps, args.dry_run)  # after every step: a cut-off run still reports
    write_summary(out, info, steps, args.dry_run)
    print((out / "summary.md").read_text())
    failed = [s.name for s in steps if s.status.startswith(("failed", "timed out"))]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
