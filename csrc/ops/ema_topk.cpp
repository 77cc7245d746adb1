// Front-ends of ema_topk_ and ema_topk_multi_: every matrix is checked (its arguments, then what an in-place op
// must check: grad mode, inference tensors, overlap) before any is touched; then the slice layouts, contiguity,
// and one call of the backend's launcher per (device, dtype).

#include "common/checks.h"
#include "ops.h"

#include <algorithm>
#include <string>

namespace sparse_adapt {
namespace {

// A matrix whose operands have been checked (d: dim made non-negative).
TopkMatrix prepare(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& score, int64_t k, int64_t d) {
  const int64_t rows = param.size(0), cols = param.size(1);
  // dim=1: one slice per row, contiguous. dim=0: one slice per column, strided by the row length.
  const SliceLayout layout = d == 1 ? SliceLayout{rows, cols, cols, 1} : SliceLayout{cols, rows, 1, cols};
  // In place on non-contiguous tensors: the kernels work on contiguous copies, written back afterwards.
  return {param.contiguous(), grad.contiguous(), score.contiguous(), layout, k};
}

void write_back(const TopkMatrix& m, const at::Tensor& param, const at::Tensor& score) {
  if (!m.param.is_same(param)) {
    param.copy_(m.param);
  }
  if (!m.score.is_same(score)) {
    score.copy_(m.score);
  }
}

// Every operand of the call, for check_in_place_operands: params and scores are written, grads read.
void check_operands(const char* op, at::TensorList params, at::TensorList grads, at::TensorList scores, bool multi) {
  std::vector<InPlaceOperand> operands;
  operands.reserve(3 * params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t index = multi ? static_cast<int64_t>(i) : -1;
    operands.push_back({&params[i], multi ? "params" : "param", index, true});
    operands.push_back({&grads[i], multi ? "grads" : "grad", index, false});
    operands.push_back({&scores[i], multi ? "scores" : "score", index, true});
  }
  check_in_place_operands(op, operands);
}

void bump_versions(at::TensorList params, at::TensorList scores) {
  for (size_t i = 0; i < params.size(); ++i) {
    bump_version(params[i]);
    bump_version(scores[i]);
  }
}

}  // namespace

void ema_topk_(
    EmaTopkLauncher launch, const at::Tensor& param, const at::Tensor& grad, const at::Tensor& score, double beta,
    int64_t k, int64_t dim) {
  const int64_t d = check_ema_topk_operands("ema_topk_", param, grad, score, beta, k, dim);
  check_operands("ema_topk_", param, grad, score, /*multi=*/false);
  const TopkMatrix m = prepare(param, grad, score, k, d);
  launch({m}, beta);
  write_back(m, param, score);
  bump_versions(param, score);
}

void ema_topk_multi_(
    EmaTopkLauncher launch, at::TensorList params, at::TensorList grads, at::TensorList scores, double beta,
    at::IntArrayRef ks, at::IntArrayRef dims) {
  constexpr const char* op = "ema_topk_multi_";
  const size_t n = params.size();
  TORCH_CHECK_VALUE(
      grads.size() == n && scores.size() == n && ks.size() == n && dims.size() == n, "sparse_adapt.", op,
      ": params, grads, scores, ks and dims must have one entry per matrix, got ", n, ", ", grads.size(), ", ",
      scores.size(), ", ", ks.size(), " and ", dims.size());
  std::vector<int64_t> ds(n);
  for (size_t i = 0; i < n; ++i) {
    ds[i] = check_ema_topk_operands(op, params[i], grads[i], scores[i], beta, ks[i], dims[i], static_cast<int64_t>(i));
  }
  check_operands(op, params, grads, scores, /*multi=*/true);
  std::vector<TopkMatrix> matrices;
  matrices.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    matrices.push_back(prepare(params[i], grads[i], scores[i], ks[i], ds[i]));
  }
  // One launcher call per (device, dtype): each runs all of its matrices at once.
  std::vector<std::vector<TopkMatrix>> groups;
  for (TopkMatrix& m : matrices) {
    auto same = [&](const std::vector<TopkMatrix>& g) {
      return g.front().param.device() == m.param.device() && g.front().param.scalar_type() == m.param.scalar_type();
    };
    auto it = std::find_if(groups.begin(), groups.end(), same);
    if (it == groups.end()) {
      groups.emplace_back();
      it = groups.end() - 1;
    }
    it->push_back(m);
  }
  for (const auto& group : groups) {
    launch(group, beta);
  }
  for (size_t i = 0; i < n; ++i) {
    write_back(matrices[i], params[i], scores[i]);
  }
  bump_versions(params, scores);
}

}  // namespace sparse_adapt
