#pragma once
// Error checks of the CUDA launchers.

#include <cuda_runtime.h>

namespace sparse_adapt {

// Throws for a failed CUDA call. A GPU this build has no kernel image for (an arch left out of
// TORCH_CUDA_ARCH_LIST) gets a message that names its arch, the archs built and how to rebuild.
void check_cuda(cudaError_t err, const char* op);

// check_cuda on the error of the launch just made.
inline void check_launch(const char* op) {
  check_cuda(cudaGetLastError(), op);
}

}  // namespace sparse_adapt
