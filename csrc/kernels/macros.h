#pragma once
// Lets one inline function serve the CPU kernels (g++) and the CUDA kernels (nvcc).

#if defined(__CUDACC__) || defined(__HIPCC__)
#define SA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SA_HOST_DEVICE inline
#endif

// Full unrolling of a loop with a compile-time trip count, on both compilers.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define SA_UNROLL _Pragma("unroll")
#else
#define SA_UNROLL _Pragma("GCC unroll 16")
#endif
