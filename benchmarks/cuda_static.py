"""What the CUDA kernels compile to, read from the built library without a GPU (`make sass`).

For every kernel and arch of sparse_adapt's native library: registers, stack (spills), static shared memory and
constant bank use (`cuobjdump -res-usage`), and the widths of its global and shared loads and stores counted in the
disassembly (`cuobjdump -sass`): `LDG.E.128` is a 16-byte load, `LDG.E.U16` a 2-byte one, `STG.E.EF.128` a 16-byte
evict-first (streaming) store, `LDL`/`STL` local memory (spills). Also the cubins and PTX the library carries, which
say on which GPUs it runs.

    python benchmarks/cuda_static.py [--lib sparse_adapt/_C*.so] [--out benchmarks/results] [--check]

cuobjdump comes from the CUDA toolkit, or from the copy inside the triton package that torch's wheels install.
--check exits non-zero when a property the kernels are built for is missing (tests/test_cuda_static.py runs it).
"""

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# "        /*0150*/    @P0 LDG.E.128 R4, desc[UR4][R2.64] ;    /* 0x... */": the opcode after an optional predicate.
INSTRUCTION = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?(\S+)")
MEMORY_OP = re.compile(r"^((?:LDG|STG|LDS|STS|LDL|STL|LDSM|ATOMS|ATOMG|RED)(?:\.[A-Z0-9_]+)*)$")
# Properties the kernels are written to have (issue: "the bf16 merge on sm_90 must show 128-bit global loads and
# stores"): (arch, kernel-name pattern, what must hold).
# The merge's 16-byte kernels (kVector = true) without an explicit mask are LoRS's path; with a mask they keep 8 more
# registers and may spill a few bytes under the 128-register cap, which is reported, not required.
EXPECTED = [
    ("sm_90", "masked_merge_kernel<c10::BFloat16, c10::BFloat16, float, true, false>",
     "ldg128 stg128 streaming nospill"),
    ("sm_90", "masked_merge_kernel<float, c10::BFloat16, float, true, false>", "ldg128 stg128 streaming nospill"),
    ("sm_90", "masked_merge_kernel<float, float, float, true, false>", "ldg128 stg128 streaming nospill"),
    ("sm_90", "masked_merge_kernel<c10::BFloat16, c10::BFloat16, float, true, true>", "ldg128 stg128 streaming"),
    ("sm_90", "ema_topk_kernel<c10::BFloat16, true>", "nospill"),
    ("sm_90", "ema_topk_kernel<float, false>", "nospill"),
]


def find_cuobjdump():
    candidates = [os.environ.get("CUOBJDUMP")]
    cuda_home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    candidates.append(os.path.join(cuda_home, "bin", "cuobjdump"))
    candidates.append(shutil.which("cuobjdump"))
    try:
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def find_library():
    libs = sorted(glob.glob(str(ROOT / "sparse_adapt" / "_C*.so")))
    if not libs:
        raise SystemExit("no sparse_adapt/_C*.so: build it first (make build)")
    return libs[0]


def run(*cmd):
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def demangle(names):
    if not names:
        return {}
    tool = shutil.which("c++filt")
    if tool is None:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return dict(zip(names, out.splitlines()))


def short_name(demangled):
    """'void sparse_adapt::merge_cuda::masked_merge_kernel<...>(...)' -> 'masked_merge_kernel<...>'."""
    name = demangled.split("(")[0]
    name = re.sub(r"^void ", "", name)
    return re.sub(r"^[\w:]*::(?=\w+<)", "", name)


def images(cuobjdump, lib):
    """(cubin archs, ptx archs) the library carries."""
    elf = re.findall(r"\.(sm_\d+a?)\.cubin", run(cuobjdump, "-lelf", lib))
    ptx = re.findall(r"\.(sm_\d+a?)\.ptx", run(cuobjdump, "-lptx", lib))
    return sorted(set(elf), key=lambda a: int(re.sub(r"\D", "", a))), sorted(set(ptx))


def resource_usage(cuobjdump, lib, arch):
    text = run(cuobjdump, "-res-usage", "-arch", arch, lib)
    usage = {}
    for name, fields in re.findall(r"Function (\S+):\s*\n\s*(REG:.*)", text):
        usage[name] = {k.lower(): int(v) for k, v in re.findall(r"(\w+(?:\[\d+\])?):(\d+)", fields)
                       if k in ("REG", "STACK", "SHARED", "LOCAL")}
    return usage


def memory_ops(cuobjdump, lib, arch):
    text = run(cuobjdump, "-sass", "-arch", arch, lib)
    ops, current = {}, None
    for line in text.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            current = m.group(1)
            ops[current] = Counter()
            continue
        ins = INSTRUCTION.match(line)
        if current is not None and ins:
            m = MEMORY_OP.match(ins.group(1))
            if m:
                ops[current][m.group(1)] += 1
    return ops


def width(op):
    """Bytes per thread of a memory instruction: .128 -> 16, .64 -> 8, .U16/.S16 -> 2, .U8/.S8 -> 1, else 4."""
    for suffix, nbytes in ((".128", 16), (".64", 8), (".U16", 2), (".S16", 2), (".U8", 1), (".S8", 1)):
        if suffix in op:
            return nbytes
    return 4


def summarize(counter, prefix):
    widths = Counter()
    for op, n in counter.items():
        if op.split(".")[0] == prefix:
            widths[width(op)] += n
    return widths


def report(lib, cuobjdump):
    cubins, ptx = images(cuobjdump, lib)
    kernels = []
    for arch in cubins:
        usage = resource_usage(cuobjdump, lib, arch)
        ops = memory_ops(cuobjdump, lib, arch)
        names = demangle(sorted(set(usage) | set(ops)))
        for mangled in sorted(set(usage) | set(ops)):
            c = ops.get(mangled, Counter())
            kernels.append({
                "arch": arch,
                "kernel": short_name(names.get(mangled, mangled)),
                **usage.get(mangled, {}),
                "global_loads": {str(k): v for k, v in sorted(summarize(c, "LDG").items())},
                "global_stores": {str(k): v for k, v in sorted(summarize(c, "STG").items())},
                "shared_loads": {str(k): v for k, v in sorted(summarize(c, "LDS").items())},
                "streaming_stores": sum(n for op, n in c.items() if op.startswith("STG") and ".EF" in op),
                "spill_ops": sum(n for op, n in c.items() if op.startswith(("LDL", "STL"))),
                "opcodes": dict(sorted(c.items())),
            })
    return {"library": os.path.relpath(lib, ROOT), "cubins": cubins, "ptx": ptx, "kernels": kernels}


def fmt_widths(d):
    return " ".join(f"{n}x{b}B" for b, n in sorted(((int(b), n) for b, n in d.items()), reverse=True)) or "-"


def to_markdown(r):
    lines = [
        "# What the CUDA kernels compile to",
        "",
        f"Read from `{r['library']}` by `benchmarks/cuda_static.py` (`make sass`), no GPU involved. Cubins: "
        f"{', '.join(r['cubins'])}; PTX: {', '.join(r['ptx']) or 'none'}.",
        "",
        "Per kernel: registers per thread, stack bytes (spills), static shared memory, and its memory instructions "
        "in the SASS counted by width (`8x16B` = eight 16-byte instructions); `EF` counts evict-first (streaming) "
        "global stores, `spills` local-memory loads and stores.",
        "",
        "| arch | kernel | regs | stack | smem | global loads | global stores | EF | shared loads | spills |",
        "|---|---|---:|---:|---:|---|---|---:|---|---:|",
    ]
    for k in r["kernels"]:
        lines.append(
            f"| {k['arch']} | `{k['kernel']}` | {k.get('reg', '-')} | {k.get('stack', '-')} | {k.get('shared', '-')} | "
            f"{fmt_widths(k['global_loads'])} | {fmt_widths(k['global_stores'])} | {k['streaming_stores']} | "
            f"{fmt_widths(k['shared_loads'])} | {k['spill_ops']} |")
    return "\n".join(lines) + "\n"


def check(r):
    """Failures of EXPECTED, as readable strings."""
    failures = []
    for arch, pattern, wants in EXPECTED:
        found = [k for k in r["kernels"] if k["arch"] == arch and k["kernel"] == pattern]
        if not found:
            failures.append(f"{arch}: no kernel matching {pattern}")
            continue
        k = found[0]
        for want in wants.split():
            ok = {
                "ldg128": int(k["global_loads"].get("16", 0)) > 0,
                "stg128": int(k["global_stores"].get("16", 0)) > 0
                and all(int(b) == 16 for b in k["global_stores"]),
                "streaming": k["streaming_stores"] > 0,
                "nospill": k["spill_ops"] == 0 and k.get("stack", 0) == 0,
            }[want]
            if not ok:
                failures.append(f"{arch} {k['kernel']}: expected {want}, got {k}")
    return failures


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lib", help="the library to read (default: sparse_adapt/_C*.so)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="writes cuda-static.md / .json here")
    p.add_argument("--check", action="store_true", help="fail when a kernel lacks a property it is built for")
    args = p.parse_args(argv)
    cuobjdump = find_cuobjdump()
    if cuobjdump is None:
        raise SystemExit("no cuobjdump found (CUDA toolkit, or the triton package of a CUDA torch)")
    r = report(args.lib or find_library(), cuobjdump)
    if not r["cubins"]:
        raise SystemExit(f"{r['library']} has no CUDA kernels (built without CUDA?)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cuda-static.md").write_text(to_markdown(r))
    (out / "cuda-static.json").write_text(json.dumps(r, indent=1) + "\n")
    print(to_markdown(r))
    failures = check(r)
    for f in failures:
        print("MISSING:", f, file=sys.stderr)
    if args.check and failures:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
