// Front-ends of ema_topk_ and ema_topk_multi_: every matrix is checked (and the written ones for overlap) before
// any is touched; then the slice layouts, contiguity, and one call of the backend's launcher per (device, dtype).

#include "common/checks.h"
#include "ops.h"

#include <algorithm>
#include <string>

namespace sparse_adapt {
namespace {

TopkMatrix prepare(
    const char* op, const at::Tensor& param, const at::Tensor& grad, const at::Tensor& score, double beta, int64_t k,
    int64_t dim, int64_t index) {
  const int64_t d = check_ema_topk_operands(op, param, grad, score, beta, k, dim, index);
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

// The bytes of t's storage that t can reach; `kind` 0/1/2 = params/grads/scores, `index` the matrix.
struct Span {
  const char* begin;
  const char* end;
  int kind;
  size_t index;

  bool written() const {
    return kind != 1;
  }
  std::string name() const {
    static const char* kinds[] = {"params", "grads", "scores"};
    return std::string(kinds[kind]) + "[" + std::to_string(index) + "]";
  }
};

Span span_of(const at::Tensor& t, int kind, size_t index) {
  const char* base = static_cast<const char*>(t.storage().data()) + t.storage_offset() * t.element_size();
  int64_t extent = 1;
  for (int64_t d = 0; d < t.dim(); ++d) {
    extent += (t.size(d) - 1) * t.stride(d);
  }
  return {base, base + extent * t.element_size(), kind, index};
}

// A matrix the call writes (a param or a score) must share no memory with any other operand: the kernels update
// the matrices concurrently.
void check_no_overlap(const char* op, at::TensorList params, at::TensorList grads, at::TensorList scores) {
  std::vector<Span> spans;
  spans.reserve(3 * params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    spans.push_back(span_of(params[i], 0, i));
    spans.push_back(span_of(grads[i], 1, i));
    spans.push_back(span_of(scores[i], 2, i));
  }
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) { return a.begin < b.begin; });
  // Sweep in address order, remembering the span that reaches furthest so far.
  size_t reach = 0;
  for (size_t i = 1; i < spans.size(); ++i) {
    const Span& prev = spans[reach];
    const Span& cur = spans[i];
    TORCH_CHECK(
        cur.begin >= prev.end || (!cur.written() && !prev.written()), "sparse_adapt.", op, ": ", prev.name(), " and ",
        cur.name(), " share memory; every param and score must be its own tensor");
    if (cur.end > prev.end) {
      reach = i;
    }
  }
}

}  // namespace

void ema_topk_(
    EmaTopkLauncher launch, const at::Tensor& param, const at::Tensor& grad, const at::Tensor& score, double beta,
    int64_t k, int64_t dim) {
  const TopkMatrix m = prepare("ema_topk_", param, grad, score, beta, k, dim, -1);
  launch({m}, beta);
  write_back(m, param, score);
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
  std::vector<TopkMatrix> matrices;
  matrices.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    matrices.push_back(prepare(op, params[i], grads[i], scores[i], beta, ks[i], dims[i], static_cast<int64_t>(i)));
  }
  check_no_overlap(op, params, grads, scores);
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
}

}  // namespace sparse_adapt
