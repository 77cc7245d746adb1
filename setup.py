"""Build of sparse_adapt's native ops (`sparse_adapt._C`).

Switches (environment variables):
  SPARSE_ADAPT_NATIVE=0        install the Python package only (no native build)
  SPARSE_ADAPT_CUDA=auto|0|1   auto: build the CUDA kernels when torch is a CUDA build and nvcc is found;
                               1: the same, but fail loudly when they cannot be built; 0: CPU kernels only
  DEBUG=1                      -O0 -g, for gdb / sanitizers
  MAX_JOBS                     parallel compile jobs (ninja)
  TORCH_CUDA_ARCH_LIST         CUDA archs; default below (what PyTorch's CUDA 13 wheels run on), printed when used
"""

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# Cubins for Turing (T4), Ampere (8.0 also serves 8.6 / 8.9), Hopper, Blackwell datacenter (10.x) and consumer
# (12.x), and PTX of the newest for GPUs after it. A GPU with no image gets an error naming its arch and this switch.
DEFAULT_ARCH_LIST = "7.5;8.0;9.0;10.0;12.0+PTX"


def _log(msg):
    print(f"sparse_adapt setup: {msg}", file=sys.stderr)


def _env_switch(name, allowed, default):
    value = os.environ.get(name, default).strip().lower()
    if value not in allowed:
        raise SystemExit(f"{name} must be one of {'|'.join(allowed)}, got {value!r}")
    return value


def _is_toolkit(path):
    return path is not None and os.path.exists(os.path.join(path, "bin", "nvcc")) and os.path.exists(
        os.path.join(path, "include", "cuda_runtime.h"))


def _check_cuda_home():
    """Without CUDA_HOME, torch takes the toolkit to be the directory above the first nvcc on the PATH. Where that
    nvcc is a wrapper script (/usr/local/bin/nvcc -> the real one), that directory is no toolkit and the link fails
    with `cannot find -lcudart`. Only then, and only if /usr/local/cuda is a toolkit, use that -- and say so."""
    if "CUDA_HOME" in os.environ or "CUDA_PATH" in os.environ:
        return
    nvcc = shutil.which("nvcc")
    guess = os.path.dirname(os.path.dirname(nvcc)) if nvcc else None
    if not _is_toolkit(guess) and _is_toolkit("/usr/local/cuda"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
        _log(f"the nvcc on the PATH ({nvcc}) is not inside a CUDA toolkit; using CUDA_HOME=/usr/local/cuda "
             f"(set CUDA_HOME to choose another)")


def _want_cuda(torch, cuda_home):
    mode = _env_switch("SPARSE_ADAPT_CUDA", ("auto", "0", "1"), "auto")
    if mode == "0":
        return False
    reasons = []
    # Gate on what can be *built* (a CUDA torch and a toolkit), never on torch.cuda.is_available():
    # the machine that builds the wheel often has no GPU.
    if torch.version.cuda is None:
        reasons.append(f"torch {torch.__version__} is a CPU-only build")
    if cuda_home is None or not os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        reasons.append(f"no nvcc under CUDA_HOME={cuda_home}")
    if not reasons:
        return True
    if mode == "1":
        raise SystemExit("SPARSE_ADAPT_CUDA=1 but the CUDA kernels cannot be built: " + "; ".join(reasons))
    _log("building CPU kernels only (" + "; ".join(reasons) + ")")
    return False


def _extensions():
    if _env_switch("SPARSE_ADAPT_NATIVE", ("0", "1"), "1") == "0":
        _log("SPARSE_ADAPT_NATIVE=0: skipping the native build")
        return [], {}
    _check_cuda_home()
    import torch
    from torch.utils import cpp_extension

    with_cuda = _want_cuda(torch, cpp_extension.CUDA_HOME)
    debug = os.environ.get("DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3", "-g0"]
    nvcc_opt = ["-O0", "-g", "-G"] if debug else ["-O3", "-lineinfo"]

    csrc = os.path.join(ROOT, "csrc")
    sources = sorted(
        s for s in glob.glob(os.path.join(csrc, "**", "*.cpp"), recursive=True)
        if os.sep + "cuda" + os.sep not in s
    )
    extra = {
        "cxx": opt + ["-DPy_LIMITED_API=0x030A0000", "-fdiagnostics-color=always"],
    }
    if with_cuda:
        cuda_dir = os.path.join(csrc, "cuda")
        sources += sorted(glob.glob(os.path.join(cuda_dir, "*.cu")) + glob.glob(os.path.join(cuda_dir, "*.cpp")))
        extra["cxx"].append("-DSPARSE_ADAPT_WITH_CUDA")
        # No --use_fast_math: it flushes denormals to zero, and a denormal weight must stay non-zero.
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
            _log(f"TORCH_CUDA_ARCH_LIST not set; using the default {DEFAULT_ARCH_LIST}")
        # The arch list goes into the error a GPU without a kernel image gets ('/' for ';', which a shell splits on).
        archs = os.environ["TORCH_CUDA_ARCH_LIST"].replace(";", "/").replace(" ", "/")
        extra["nvcc"] = nvcc_opt + ["-DSPARSE_ADAPT_WITH_CUDA"]
        extra["cxx"].append(f"-DSPARSE_ADAPT_CUDA_ARCHS={archs}")
        _log(f"building CPU + CUDA kernels (CUDA {torch.version.cuda}, "
             f"archs {os.environ['TORCH_CUDA_ARCH_LIST']}, CUDA_HOME={cpp_extension.CUDA_HOME})")
        ext_cls = cpp_extension.CUDAExtension
    else:
        ext_cls = cpp_extension.CppExtension

    ext = ext_cls(
        name="sparse_adapt._C",
        sources=[os.path.relpath(s, ROOT) for s in sources],
        include_dirs=[csrc],
        extra_compile_args=extra,
        py_limited_api=True,
    )
    cmdclass = {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}
    return [ext], cmdclass


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["sparse_adapt", "sparse_adapt.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
