// The CPU backend: every op, bound to the CPU launchers.

#include "ops.h"

namespace sparse_adapt {

TORCH_LIBRARY_IMPL(sparse_adapt, CPU, m) {
  register_backend_ops<masked_merge_launch_cpu, ema_topk_launch_cpu>(m);
}

}  // namespace sparse_adapt
