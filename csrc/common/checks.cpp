#include "common/checks.h"

#include <ATen/MemoryOverlap.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <cmath>
#include <sstream>

namespace sparse_adapt {

std::string shape_str(const at::Tensor& t) {
  std::ostringstream os;
  os << "(";
  for (int64_t d = 0; d < t.dim(); ++d) {
    os << (d ? ", " : "") << t.size(d);
  }
  os << (t.dim() == 1 ? ",)" : ")");
  return os.str();
}

namespace {

bool is_supported_floating(at::ScalarType st) {
  return st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16;
}

}  // namespace

void check_floating(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.defined(), "sparse_adapt.", op, ": ", name, " is an undefined tensor");
  TORCH_CHECK(
      is_supported_floating(t.scalar_type()), "sparse_adapt.", op, ": ", name,
      " must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
}

void check_floating_dtype(const char* op, const char* name, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(
      is_supported_floating(dtype), "sparse_adapt.", op, ": ", name,
      " must be float32, float64, float16 or bfloat16, got ", dtype);
}

void check_like(
    const char* op, const char* name, const at::Tensor& t, const char* ref_name, const at::Tensor& ref,
    bool any_dtype) {
  TORCH_CHECK(
      t.device() == ref.device(), "sparse_adapt.", op, ": ", name, " is on ", t.device(), " but ", ref_name, " is on ",
      ref.device(), "; all operands must be on one device");
  TORCH_CHECK(
      any_dtype || t.scalar_type() == ref.scalar_type(), "sparse_adapt.", op, ": ", name, " has dtype ",
      t.scalar_type(), " but ", ref_name, " has dtype ", ref.scalar_type(),
      "; cast them to one dtype (mixed precision: run under torch.autocast)");
}

void check_lora_operands(
    const char* op, const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale,
    const std::optional<at::Tensor>& mask, bool mixed) {
  check_floating(op, "weight", weight);
  check_floating(op, "lora_A", lora_A);
  check_floating(op, "lora_B", lora_B);
  TORCH_CHECK(weight.dim() == 2, "sparse_adapt.", op, ": weight must be 2-D (out, in), got shape ", shape_str(weight));
  TORCH_CHECK(lora_A.dim() == 2, "sparse_adapt.", op, ": lora_A must be 2-D (r, in), got shape ", shape_str(lora_A));
  TORCH_CHECK(lora_B.dim() == 2, "sparse_adapt.", op, ": lora_B must be 2-D (out, r), got shape ", shape_str(lora_B));
  const int64_t out = weight.size(0), in = weight.size(1), r = lora_A.size(0);
  TORCH_CHECK(
      out > 0 && in > 0, "sparse_adapt.", op, ": weight is empty, shape ", shape_str(weight),
      "; there is nothing to adapt");
  TORCH_CHECK(
      r > 0, "sparse_adapt.", op, ": lora_A has rank 0 (shape ", shape_str(lora_A), "); the rank r must be >= 1");
  TORCH_CHECK(
      lora_A.size(1) == in, "sparse_adapt.", op, ": lora_A must have shape (r, in) = (r, ", in, ") to match weight ",
      shape_str(weight), ", got ", shape_str(lora_A));
  TORCH_CHECK(
      lora_B.size(0) == out && lora_B.size(1) == r, "sparse_adapt.", op, ": lora_B must have shape (out, r) = (", out,
      ", ", r, ") to match weight ", shape_str(weight), " and lora_A ", shape_str(lora_A), ", got ", shape_str(lora_B));
  check_like(op, "lora_A", lora_A, "weight", weight, mixed);
  check_like(op, "lora_B", lora_B, "weight", weight, mixed);
  TORCH_CHECK_VALUE(std::isfinite(scale), "sparse_adapt.", op, ": scale must be finite, got ", scale);
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK(m.defined(), "sparse_adapt.", op, ": mask is an undefined tensor");
    TORCH_CHECK(
        m.scalar_type() == at::kBool, "sparse_adapt.", op, ": mask must be a bool tensor, got dtype ", m.scalar_type(),
        " (use mask.bool() or weight != 0)");
    TORCH_CHECK(
        m.sizes() == weight.sizes(), "sparse_adapt.", op, ": mask must have weight's shape ", shape_str(weight),
        ", got ", shape_str(m));
    TORCH_CHECK(
        m.device() == weight.device(), "sparse_adapt.", op, ": mask is on ", m.device(), " but weight is on ",
        weight.device());
  }
}

void check_linear_input(
    const char* op, const at::Tensor& x, const std::optional<at::Tensor>& bias, const at::Tensor& weight,
    std::optional<at::ScalarType> compute_dtype) {
  check_floating(op, "x", x);
  const int64_t in = weight.size(1), out = weight.size(0);
  TORCH_CHECK(
      x.dim() >= 1 && x.size(-1) == in, "sparse_adapt.", op, ": x must have shape (..., in) = (..., ", in,
      ") to match weight ", shape_str(weight), ", got ", shape_str(x));
  if (compute_dtype.has_value()) {
    check_floating_dtype(op, "compute_dtype", *compute_dtype);
    check_like(op, "x", x, "weight", weight, /*any_dtype=*/true);
    TORCH_CHECK(
        x.scalar_type() == *compute_dtype, "sparse_adapt.", op, ": x has dtype ", x.scalar_type(),
        " but compute_dtype is ", *compute_dtype, "; x must be in the compute dtype");
  } else {
    check_like(op, "x", x, "weight", weight);
  }
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    check_floating(op, "bias", b);
    TORCH_CHECK(
        b.dim() == 1 && b.size(0) == out, "sparse_adapt.", op, ": bias must have shape (out,) = (", out,
        ",) to match weight ", shape_str(weight), ", got ", shape_str(b));
    check_like(op, "bias", b, "weight", weight, compute_dtype.has_value());
  }
}

int64_t check_ema_topk_operands(
    const char* op, const at::Tensor& param, const at::Tensor& grad, const at::Tensor& score, double beta, int64_t k,
    int64_t dim, int64_t index) {
  // Argument names, built only for a message: "param", or "params[3]" in the multi-tensor form (called per matrix
  // on every pruning step, so the checks must cost nothing when they pass).
  const auto name = [index](const char* single, const char* list) {
    return index < 0 ? std::string(single) : std::string(list) + "[" + std::to_string(index) + "]";
  };
  const auto p = [&] { return name("param", "params"); };
  const auto g = [&] { return name("grad", "grads"); };
  const auto s = [&] { return name("score", "scores"); };
  TORCH_CHECK(param.defined(), "sparse_adapt.", op, ": ", p(), " is an undefined tensor");
  TORCH_CHECK(grad.defined(), "sparse_adapt.", op, ": ", g(), " is an undefined tensor");
  TORCH_CHECK(
      is_supported_floating(param.scalar_type()), "sparse_adapt.", op, ": ", p(),
      " must be float32, float64, float16 or bfloat16, got ", param.scalar_type());
  TORCH_CHECK(param.dim() == 2, "sparse_adapt.", op, ": ", p(), " must be 2-D, got shape ", shape_str(param));
  TORCH_CHECK(param.numel() > 0, "sparse_adapt.", op, ": ", p(), " is empty, shape ", shape_str(param));
  TORCH_CHECK(
      grad.sizes() == param.sizes(), "sparse_adapt.", op, ": ", g(), " must have ", p(), "'s shape ", shape_str(param),
      ", got ", shape_str(grad));
  TORCH_CHECK(
      grad.device() == param.device(), "sparse_adapt.", op, ": ", g(), " is on ", grad.device(), " but ", p(),
      " is on ", param.device(), "; all operands must be on one device");
  TORCH_CHECK(
      grad.scalar_type() == param.scalar_type(), "sparse_adapt.", op, ": ", g(), " has dtype ", grad.scalar_type(),
      " but ", p(), " has dtype ", param.scalar_type(), "; cast them to one dtype");
  TORCH_CHECK(score.defined(), "sparse_adapt.", op, ": ", s(), " is an undefined tensor");
  TORCH_CHECK(
      score.scalar_type() == at::kFloat, "sparse_adapt.", op, ": ", s(),
      " must be float32 (it accumulates an EMA), got ", score.scalar_type());
  TORCH_CHECK(
      score.sizes() == param.sizes(), "sparse_adapt.", op, ": ", s(), " must have ", p(), "'s shape ", shape_str(param),
      ", got ", shape_str(score));
  TORCH_CHECK(
      score.device() == param.device(), "sparse_adapt.", op, ": ", s(), " is on ", score.device(), " but ", p(),
      " is on ", param.device());
  TORCH_CHECK(!score.is_same(param) && !score.is_same(grad), "sparse_adapt.", op, ": ", s(), " must be its own tensor");
  TORCH_CHECK_VALUE(
      dim >= -2 && dim <= 1, "sparse_adapt.", op, ": dim must be 0 (per column) or 1 (per row) of the 2-D ", p(),
      ", got ", dim);
  TORCH_CHECK_VALUE(beta >= 0.0 && beta <= 1.0, "sparse_adapt.", op, ": beta must be in [0, 1], got ", beta);
  const int64_t d = dim < 0 ? dim + 2 : dim;
  const int64_t n = param.size(d);
  TORCH_CHECK_VALUE(
      k >= 0 && k <= n, "sparse_adapt.", op, ": k must be in [0, ", n, "] (the length of ", p(), " ", shape_str(param),
      " along dim ", dim, "), got ", k);
  TORCH_CHECK(n <= 0xFFFFFFFFLL, "sparse_adapt.", op, ": slices longer than 2^32 entries are not supported");
  return d;
}

std::string InPlaceOperand::display_name() const {
  return index < 0 ? std::string(name) : std::string(name) + "[" + std::to_string(index) + "]";
}

namespace {

// The bytes of its storage that a tensor can reach.
struct Span {
  const char* begin;
  const char* end;
  const InPlaceOperand* operand;
};

Span span_of(const InPlaceOperand& operand) {
  const at::Tensor& t = *operand.tensor;
  const char* base = static_cast<const char*>(t.storage().data()) + t.storage_offset() * t.element_size();
  int64_t extent = 1;
  for (int64_t d = 0; d < t.dim(); ++d) {
    extent += (t.size(d) - 1) * t.stride(d);
  }
  return {base, base + extent * t.element_size(), &operand};
}

}  // namespace

void check_in_place_operands(const char* op, const std::vector<InPlaceOperand>& operands) {
  const bool grad_mode = at::GradMode::is_enabled();
  for (const InPlaceOperand& operand : operands) {
    const at::Tensor& t = *operand.tensor;
    if (!t.defined()) {
      continue;
    }
    TORCH_CHECK(
        !(grad_mode && t.requires_grad()), "sparse_adapt.", op, ": ", operand.display_name(), " requires grad, but ",
        op, " is not differentiable (it ", operand.written ? "writes it in place" : "would drop its gradient",
        "); call it under torch.no_grad()");
    if (!operand.written) {
      continue;
    }
    TORCH_CHECK(
        !t.is_inference() || c10::InferenceMode::is_enabled(), "sparse_adapt.", op, ": ", operand.display_name(),
        " is an inference tensor; it can be updated in place only inside torch.inference_mode()");
    TORCH_CHECK(
        at::has_internal_overlap(t) != at::MemOverlap::Yes, "sparse_adapt.", op, ": ", operand.display_name(),
        " has elements that share memory (an expanded tensor?); it cannot be written in place -- clone it first");
  }
  // Every written operand must share no memory with any other: sweep the spans in address order, remembering
  // the one that reaches furthest so far. (Conservative for interleaved views of one storage, which it refuses.)
  std::vector<Span> spans;
  spans.reserve(operands.size());
  for (const InPlaceOperand& operand : operands) {
    if (operand.tensor->defined() && operand.tensor->numel() > 0) {
      spans.push_back(span_of(operand));
    }
  }
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) { return a.begin < b.begin; });
  size_t reach = 0;
  for (size_t i = 1; i < spans.size(); ++i) {
    const Span& prev = spans[reach];
    const Span& cur = spans[i];
    TORCH_CHECK(
        cur.begin >= prev.end || (!cur.operand->written && !prev.operand->written), "sparse_adapt.", op, ": ",
        prev.operand->display_name(), " and ", cur.operand->display_name(), " share memory, and ", op, " writes ",
        prev.operand->written ? prev.operand->display_name() : cur.operand->display_name(),
        "; pass tensors that do not overlap (clone one of them)");
    if (cur.end > prev.end) {
      reach = i;
    }
  }
}

void bump_version(const at::Tensor& t) {
  if (!t.is_inference()) {  // inference tensors have no version counter
    t.unsafeGetTensorImpl()->bump_version();
  }
}

}  // namespace sparse_adapt
