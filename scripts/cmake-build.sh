#!/usr/bin/env bash
# Configure, build and run the C++ side (CMakeLists.txt) against the current Python's torch.
#   scripts/cmake-build.sh [build-dir]
# env: PYTHON, SPARSE_ADAPT_CPP_CUDA=0|1 (the CUDA kernels in the C++ tests and benchmarks; needs
#      TORCH_CUDA_ARCH_LIST; make gpu-check sets both), CPP_TESTS=0 (build only), MAX_JOBS,
#      CMAKE_EXTRA (more -D options)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
BUILD_DIR=${1:-build/cmake}
CUDA=${SPARSE_ADAPT_CPP_CUDA:-0}

prefix=$("$PYTHON" -c 'import torch; print(torch.utils.cmake_prefix_path)')
site=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
torch_cuda=$("$PYTHON" -c 'import torch; print(torch.version.cuda or "")')
nvcc=${CUDA_HOME:-/usr/local/cuda}/bin/nvcc

flags=()
if [[ -n "$torch_cuda" ]]; then
  # A CUDA torch's CMake config looks for the toolkit even for CPU targets. Where the toolkit lacks nvrtc (some
  # minimal installs do), point it at the one the torch wheels carry.
  flags+=("-DCUDA_TOOLKIT_ROOT_DIR=$(dirname "$(dirname "$nvcc")")" "-DCMAKE_CUDA_COMPILER=$nvcc")
  if ! ls "$(dirname "$(dirname "$nvcc")")"/lib*/libnvrtc.so* >/dev/null 2>&1; then
    nvrtc=$(ls "$site"/nvidia/cu*/lib/libnvrtc.so.* 2>/dev/null | grep -v builtins | head -n 1 || true)
    [[ -n "$nvrtc" ]] && flags+=("-DCUDA_nvrtc_LIBRARY=$nvrtc")
  fi
fi
cuda=OFF
if [[ "$CUDA" == 1 ]]; then
  [[ -n "$torch_cuda" && -x "$nvcc" ]] || { echo "SPARSE_ADAPT_CPP_CUDA=1 but torch is not a CUDA build or $nvcc is missing" >&2; exit 1; }
  [[ -n "${TORCH_CUDA_ARCH_LIST:-}" ]] || { echo "SPARSE_ADAPT_CPP_CUDA=1 needs TORCH_CUDA_ARCH_LIST" >&2; exit 1; }
  cuda=ON
fi
echo "cmake: torch $("$PYTHON" -c 'import torch; print(torch.__version__)'), CUDA kernels $cuda${TORCH_CUDA_ARCH_LIST:+ (archs $TORCH_CUDA_ARCH_LIST)}"

mkdir -p "$(dirname "$BUILD_DIR")"
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$prefix" \
  -DPython3_EXECUTABLE="$(command -v "$PYTHON")" -DSPARSE_ADAPT_CUDA=$cuda \
  "${flags[@]}" ${CMAKE_EXTRA:-} > "$BUILD_DIR.configure.log" 2>&1 || { cat "$BUILD_DIR.configure.log"; exit 1; }
cmake --build "$BUILD_DIR" -j "${MAX_JOBS:-2}"
if [[ "${CPP_TESTS:-1}" != 0 ]]; then
  ctest --test-dir "$BUILD_DIR" --output-on-failure
fi
