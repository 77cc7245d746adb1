// The CUDA backend: every op, bound to the CUDA launchers. A .cpp (compiled by the host compiler) in cuda/,
// so it is built only with the CUDA kernels.

#include "ops.h"

namespace sparse_adapt {

TORCH_LIBRARY_IMPL(sparse_adapt, CUDA, m) {
  register_backend_ops<masked_merge_launch_cuda, ema_topk_launch_cuda>(m);
}

}  // namespace sparse_adapt
