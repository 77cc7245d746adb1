#include "cuda/errors.h"

#include <c10/util/Exception.h>

namespace sparse_adapt {
namespace {

#define SA_STRINGIZE(...) #__VA_ARGS__
#define SA_STRINGIZE_VALUE(...) SA_STRINGIZE(__VA_ARGS__)
#ifdef SPARSE_ADAPT_CUDA_ARCHS
// setup.py / CMake pass the arch list with '/' for ';' (a shell would split on it), e.g. 8.0/9.0/10.0/12.0+PTX.
constexpr const char* kBuiltArchs = SA_STRINGIZE_VALUE(SPARSE_ADAPT_CUDA_ARCHS);
#else
constexpr const char* kBuiltArchs = "(not recorded)";
#endif

}  // namespace

void check_cuda(cudaError_t err, const char* op) {
  if (err == cudaSuccess) {
    return;
  }
  if (err == cudaErrorNoKernelImageForDevice || err == cudaErrorInvalidDeviceFunction) {
    cudaGetLastError();  // not a sticky error: clear it, so the process can go on
    int device = 0, major = 0, minor = 0;
    cudaGetDevice(&device);
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
    TORCH_CHECK(
        false, "sparse_adapt.", op, ": this build of sparse_adapt has no CUDA kernel for this GPU (compute capability ",
        major, ".", minor, ", sm_", major, minor, "); it was built for ", kBuiltArchs,
        ". Rebuild it for your GPU from its source tree: TORCH_CUDA_ARCH_LIST=\"", major, ".", minor,
        "\" pip install --no-build-isolation . (or TORCH_CUDA_ARCH_LIST=\"", major, ".", minor, "\" make build)");
  }
  TORCH_CHECK(false, "sparse_adapt.", op, ": CUDA error: ", cudaGetErrorString(err));
}

}  // namespace sparse_adapt
