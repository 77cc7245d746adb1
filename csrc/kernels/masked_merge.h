#pragma once
// Per-element arithmetic of the masked merge  merged = weight + scale * (lora_B @ lora_A) ⊙ M,
// shared by the CPU kernel (cpu/masked_merge.cpp) and the CUDA kernel (cuda/masked_merge.cu) so the CPU tests
// exercise the arithmetic the GPU runs. `acc_t` is at::opmath_type<scalar_t>: float for half types.

#include "kernels/macros.h"

#include <cstdint>

namespace sparse_adapt::kernels {

// M: an explicit mask wins; without one the weight's own non-zeros are the mask, so no pruned zero can
// become non-zero.
template <typename acc_t>
SA_HOST_DEVICE bool merge_keeps(acc_t w, const bool* mask, int64_t idx) {
  return mask != nullptr ? mask[idx] : w != acc_t(0);
}

// One rounding to scalar_t, after the float accumulation. A masked-out element is returned bit for bit.
template <typename scalar_t, typename acc_t>
SA_HOST_DEVICE scalar_t merged_value(scalar_t w, acc_t delta, acc_t scale, const bool* mask, int64_t idx) {
  const acc_t wf = static_cast<acc_t>(w);
  return merge_keeps(wf, mask, idx) ? static_cast<scalar_t>(wf + scale * delta) : w;
}

}  // namespace sparse_adapt::kernels
