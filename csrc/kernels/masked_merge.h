#pragma once
// Arithmetic of the masked merge  out = weight + scale * (lora_B @ lora_A) ⊙ M, shared by the CPU kernel
// (cpu/masked_merge.cpp) and the CUDA kernel (cuda/masked_merge_kernel.cuh): the rank-r accumulation of the
// low-rank delta and the per-element epilogue are written once, here, so the CPU tests run the arithmetic the GPU
// runs. `acc_t` is at::opmath_type of the output dtype (float for half types, double for float64). The weight may
// be stored in another dtype than the output (an fp32 weight merged straight into bf16 under autocast).

#include "kernels/macros.h"

#include <limits>

namespace sparse_adapt::kernels {

// One rank's contribution to a TR x TC register tile of B @ A: acc[i][j] += b[i] * a[j]. Every element sums its r
// products in rank order, in acc_t. The CPU kernel's "columns" are SIMD vectors of acc_t (b broadcasts), the CUDA
// kernel's are scalars; the compilers may contract the multiply-add into an FMA (nvcc always does), which is the
// one rounding in which the backends can differ.
template <int TR, int TC, typename acc_t, typename b_t, typename a_t>
SA_HOST_DEVICE void rank1_update(acc_t (&acc)[TR][TC], const b_t (&b)[TR], const a_t (&a)[TC]) {
  SA_UNROLL
  for (int i = 0; i < TR; ++i) {
    SA_UNROLL
    for (int j = 0; j < TC; ++j) {
      acc[i][j] += b[i] * a[j];
    }
  }
}

// M without an explicit mask: the weight's own non-zeros, so no pruned zero can become non-zero.
template <typename acc_t, typename w_t>
SA_HOST_DEVICE bool weight_keeps(w_t w) {
  return static_cast<acc_t>(w) != acc_t(0);
}

// The smallest normal number of out_t, in acc_t: what a kept weight becomes when its merge rounds to exactly 0.
// (Normal, not subnormal: with denormals flushed, a subnormal would compare equal to 0 again.)
template <typename out_t, typename acc_t>
SA_HOST_DEVICE acc_t smallest_normal() {
  return static_cast<acc_t>(std::numeric_limits<out_t>::min());
}

// One rounding to the output dtype, after the accumulation. A masked-out element is the weight converted to the
// output dtype: bit for bit when the dtypes agree, and a zero stays a zero in every conversion. A kept non-zero
// weight stays non-zero: where w + scale·delta rounds to exactly 0 (cancellation, or underflow in a half dtype)
// the result is the smallest normal number with the sum's sign (w's, on an exact cancellation), so the merged
// weight keeps the zero pattern and an unmerge, which reads the pattern back from the merged weight, finds it.
template <typename out_t, typename acc_t, typename w_t>
SA_HOST_DEVICE out_t merged_value(w_t w, acc_t delta, acc_t scale, bool keep) {
  // Selects, no branches: the CPU compiler vectorizes the epilogue loop that calls this.
  const acc_t wv = static_cast<acc_t>(w);
  const acc_t sum = wv + scale * delta;
  const acc_t rounded = static_cast<acc_t>(static_cast<out_t>(sum));
  const acc_t tiny = smallest_normal<out_t, acc_t>();
  const acc_t nonzero = (sum < acc_t(0) || (sum == acc_t(0) && wv < acc_t(0))) ? -tiny : tiny;
  const acc_t kept = (rounded == acc_t(0) && wv != acc_t(0)) ? nonzero : rounded;
  return keep ? static_cast<out_t>(kept) : static_cast<out_t>(w);
}

}  // namespace sparse_adapt::kernels
