#pragma once
// The few CUDA facilities the kernels under cuda/*_kernel.cuh use, named once. Compiled by nvcc they are the real
// thing; tests/cpp/cuda_emulator.h provides the same names on the CPU (one std::thread per CUDA thread, real
// barriers), so the kernels' indexing, tails and barriers run in CI, which has no GPU.

#include <cstdint>

#if defined(__CUDACC__)

#include <cuda_runtime.h>

#define SA_DEVICE __device__ __forceinline__
// Dynamic shared memory of a kernel, 16-byte aligned for vector accesses.
#define SA_DYNAMIC_SHARED(type, name) extern __shared__ __align__(16) type name[]

namespace sparse_adapt::device {

// 16 bytes from global memory, evict-first: each element of a weight is read once per merge.
SA_DEVICE int4 load16_stream(const void* p) {
  return __ldcs(static_cast<const int4*>(p));
}

// 16 bytes to global memory, evict-first (st.global.cs): the merged weight is not read again by this kernel.
SA_DEVICE void store16_stream(void* p, int4 v) {
  __stcs(static_cast<int4*>(p), v);
}

SA_DEVICE unsigned shfl_down(unsigned v, unsigned delta) {
  return __shfl_down_sync(0xffffffffu, v, delta);
}

}  // namespace sparse_adapt::device

#elif !defined(SA_CUDA_EMULATION)
#error "cuda/device.cuh: compile with nvcc, or include tests/cpp/cuda_emulator.h first"
#endif
