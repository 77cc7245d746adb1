#!/usr/bin/env bash
# Configure, build and run the C++ side (CMakeLists.txt) against the current Python's torch.
#   scripts/cmake-build.sh [build-dir]     env: PYTHON, SPARSE_ADAPT_CUDA=auto|0|1, TORCH_CUDA_ARCH_LIST, MAX_JOBS
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
BUILD_DIR=${1:-build/cmake}
MODE=${SPARSE_ADAPT_CUDA:-auto}

prefix=$("$PYTHON" -c 'import torch; print(torch.utils.cmake_prefix_path)')
site=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
torch_cuda=$("$PYTHON" -c 'import torch; print(torch.version.cuda or "")')
nvcc=${CUDA_HOME:-/usr/local/cuda}/bin/nvcc

flags=()
if [[ -n "$torch_cuda" ]]; then
  # A CUDA torch's CMake config looks for the toolkit even for CPU targets; this machine's toolkit is partial
  # (no nvrtc), so point it at the pieces the torch wheels carry.
  nvrtc=$(ls "$site"/nvidia/cu*/lib/libnvrtc.so.* 2>/dev/null | grep -v builtins | head -n 1 || true)
  flags+=("-DCUDA_TOOLKIT_ROOT_DIR=$(dirname "$(dirname "$nvcc")")" "-DCMAKE_CUDA_COMPILER=$nvcc")
  [[ -n "$nvrtc" ]] && flags+=("-DCUDA_nvrtc_LIBRARY=$nvrtc")
fi
cuda=OFF
if [[ "$MODE" != 0 && -n "$torch_cuda" && -x "$nvcc" ]]; then
  cuda=ON
elif [[ "$MODE" == 1 ]]; then
  echo "SPARSE_ADAPT_CUDA=1 but torch is not a CUDA build or $nvcc is missing" >&2
  exit 1
fi
# torch's CMake config turns TORCH_CUDA_ARCH_LIST into -gencode flags (unset, it asks for every arch the wheel
# was built for, some of which nvcc 13 rejects). One arch keeps CI's second CUDA compile short.
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
echo "cmake: torch $("$PYTHON" -c 'import torch; print(torch.__version__)'), CUDA kernels $cuda (archs $TORCH_CUDA_ARCH_LIST)"

cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$prefix" \
  -DPython3_EXECUTABLE="$(command -v "$PYTHON")" -DSPARSE_ADAPT_CUDA=$cuda \
  "${flags[@]}" > "$BUILD_DIR.configure.log" 2>&1 || { cat "$BUILD_DIR.configure.log"; exit 1; }
cmake --build "$BUILD_DIR" -j "${MAX_JOBS:-2}"
ctest --test-dir "$BUILD_DIR" --output-on-failure
