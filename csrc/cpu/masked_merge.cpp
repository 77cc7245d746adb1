// CPU kernel of the masked merge.

#include "kernels/masked_merge.h"
#include "ops.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace sparse_adapt {
namespace {

// Columns per tile: the tile's float accumulators and the lora_A tile (r x kColTile) stay in L1/L2 while a
// block of rows streams through.
constexpr int64_t kColTile = 256;
// Elements per parallel task, as ATen's own elementwise kernels use (at::internal::GRAIN_SIZE).
constexpr int64_t kGrainElements = 32768;

// Compiled for AVX-512, AVX2 and the baseline, picked at load time: the extension is built without -march,
// and this loop is where the CPU path spends its time.
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define SA_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SA_CPU_CLONES
#endif

// kHasMask is a template argument so that, without a mask, the null mask pointer is a constant and the
// epilogue compiles to a branch-free, vectorized select.
template <typename scalar_t, bool kHasMask>
SA_CPU_CLONES void masked_merge_rows(
    const scalar_t* weight,                    // (out, in)
    const at::opmath_type<scalar_t>* lora_A,  // (r, in)
    const at::opmath_type<scalar_t>* lora_B,  // (out, r)
    const bool* mask,                          // (out, in); ignored unless kHasMask (then M = weight != 0)
    at::opmath_type<scalar_t> scale,
    scalar_t* out,  // (out, in), may alias weight
    int64_t in, int64_t r, int64_t row_begin, int64_t row_end) {
  using acc_t = at::opmath_type<scalar_t>;
  const bool* m = kHasMask ? mask : nullptr;
  acc_t acc[kColTile];
  for (int64_t c0 = 0; c0 < in; c0 += kColTile) {
    const int64_t n = std::min(kColTile, in - c0);
    for (int64_t row = row_begin; row < row_end; ++row) {
      std::fill(acc, acc + n, acc_t(0));
      // delta[row, c0:c0+n] = sum_k B[row, k] * A[k, c0:c0+n]: unit-stride, vectorizable inner loop.
      for (int64_t k = 0; k < r; ++k) {
        const acc_t b = lora_B[row * r + k];
        const acc_t* a = lora_A + k * in + c0;
        for (int64_t j = 0; j < n; ++j) {
          acc[j] += b * a[j];
        }
      }
      const int64_t base = row * in + c0;
      for (int64_t j = 0; j < n; ++j) {
        out[base + j] = kernels::merged_value(weight[base + j], acc[j], scale, m, base + j);
      }
    }
  }
}

}  // namespace

void masked_merge_launch_cpu(
    const at::Tensor& weight, const at::Tensor& lora_A_acc, const at::Tensor& lora_B_acc, double scale,
    const at::Tensor& mask, const at::Tensor& out) {
  const int64_t rows = weight.size(0), in = weight.size(1), r = lora_A_acc.size(0);
  const bool* mask_ptr = mask.defined() ? mask.const_data_ptr<bool>() : nullptr;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / in);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "masked_merge_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* w = weight.const_data_ptr<scalar_t>();
    const acc_t* a = lora_A_acc.const_data_ptr<acc_t>();
    const acc_t* b = lora_B_acc.const_data_ptr<acc_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const auto s = static_cast<acc_t>(scale);
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      if (mask_ptr != nullptr) {
        masked_merge_rows<scalar_t, true>(w, a, b, mask_ptr, s, o, in, r, begin, end);
      } else {
        masked_merge_rows<scalar_t, false>(w, a, b, nullptr, s, o, in, r, begin, end);
      }
    });
  });
}

}  // namespace sparse_adapt
