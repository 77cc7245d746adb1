// Front-end of ema_topk_: checks, the slice layout, contiguity; then one launch.

#include "common/checks.h"
#include "ops.h"

namespace sparse_adapt {

void ema_topk_(
    EmaTopkLauncher launch, const at::Tensor& param, const at::Tensor& grad, const at::Tensor& score, double beta,
    int64_t k, int64_t dim) {
  const int64_t d = check_ema_topk_operands(param, grad, score, beta, k, dim);
  const int64_t rows = param.size(0), cols = param.size(1);
  // dim=1: one slice per row, contiguous. dim=0: one slice per column, strided by the row length.
  const SliceLayout layout = d == 1 ? SliceLayout{rows, cols, cols, 1} : SliceLayout{cols, rows, 1, cols};
  // In-place on non-contiguous tensors: work on contiguous copies, then write back.
  const at::Tensor p = param.contiguous();
  const at::Tensor s = score.contiguous();
  launch(p, grad.contiguous(), s, beta, k, layout);
  if (!p.is_same(param)) {
    param.copy_(p);
  }
  if (!s.is_same(score)) {
    score.copy_(s);
  }
}

}  // namespace sparse_adapt
