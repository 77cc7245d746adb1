// CPU kernel of ema_topk_: slices in parallel; per slice, the EMA update, then a linear-time selection
// (std::nth_element) of the k largest keys.

#include "kernels/ema_topk.h"
#include "ops.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <functional>
#include <vector>

namespace sparse_adapt {
namespace {

template <typename scalar_t>
void ema_topk_slices(
    scalar_t* param,        // (rows, cols)
    const scalar_t* grad,   // (rows, cols)
    float* score,           // (rows, cols)
    float beta, int64_t k, const SliceLayout& layout, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = layout.n;
  std::vector<uint64_t> keys(static_cast<size_t>(n));
  for (int64_t slice = begin; slice < end; ++slice) {
    const int64_t base = slice * layout.slice_stride;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t off = base + i * layout.elem_stride;
      score[off] = kernels::ema_score<acc_t>(score[off], param[off], grad[off], beta);
      keys[i] = kernels::topk_key(score[off], i);
    }
    if (k == n) {
      continue;
    }
    uint64_t threshold = ~uint64_t(0);  // k == 0: nothing reaches it
    if (k > 0) {
      std::nth_element(keys.begin(), keys.begin() + (k - 1), keys.end(), std::greater<uint64_t>());
      threshold = keys[k - 1];
    }
    for (int64_t i = 0; i < n; ++i) {
      const int64_t off = base + i * layout.elem_stride;
      if (kernels::topk_key(score[off], i) < threshold) {
        param[off] = scalar_t(0);
      }
    }
  }
}

}  // namespace

void ema_topk_launch_cpu(
    const at::Tensor& param, const at::Tensor& grad, const at::Tensor& score, double beta, int64_t k,
    SliceLayout layout) {
  const int64_t grain = std::max<int64_t>(1, 32768 / layout.n);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(), "ema_topk_cpu", [&] {
    scalar_t* p = param.mutable_data_ptr<scalar_t>();
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    float* s = score.mutable_data_ptr<float>();
    at::parallel_for(0, layout.slices, grain, [&](int64_t begin, int64_t end) {
      ema_topk_slices<scalar_t>(p, g, s, static_cast<float>(beta), k, layout, begin, end);
    });
  });
}

}  // namespace sparse_adapt
