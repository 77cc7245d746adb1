#include "common/checks.h"

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

void check_floating(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.defined(), "sparse_adapt.", op, ": ", name, " is an undefined tensor");
  const auto st = t.scalar_type();
  TORCH_CHECK(
      st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
      "sparse_adapt.", op, ": ", name, " must be float32, float64, float16 or bfloat16, got ", st);
}

void check_like(const char* op, const char* name, const at::Tensor& t, const char* ref_name, const at::Tensor& ref) {
  TORCH_CHECK(
      t.device() == ref.device(),
      "sparse_adapt.", op, ": ", name, " is on ", t.device(), " but ", ref_name, " is on ", ref.device(),
      "; all operands must be on one device");
  TORCH_CHECK(
      t.scalar_type() == ref.scalar_type(),
      "sparse_adapt.", op, ": ", name, " has dtype ", t.scalar_type(), " but ", ref_name, " has dtype ",
      ref.scalar_type(), "; cast them to one dtype");
}

void check_lora_operands(
    const char* op,
    const at::Tensor& weight,
    const at::Tensor& lora_A,
    const at::Tensor& lora_B,
    double scale,
    const std::optional<at::Tensor>& mask) {
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
      lora_B.size(0) == out && lora_B.size(1) == r, "sparse_adapt.", op, ": lora_B must have shape (out, r) = (",
      out, ", ", r, ") to match weight ", shape_str(weight), " and lora_A ", shape_str(lora_A), ", got ",
      shape_str(lora_B));
  check_like(op, "lora_A", lora_A, "weight", weight);
  check_like(op, "lora_B", lora_B, "weight", weight);
  TORCH_CHECK_VALUE(std::isfinite(scale), "sparse_adapt.", op, ": scale must be finite, got ", scale);
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK(m.defined(), "sparse_adapt.", op, ": mask is an undefined tensor");
    TORCH_CHECK(
        m.scalar_type() == at::kBool, "sparse_adapt.", op, ": mask must be a bool tensor, got dtype ",
        m.scalar_type(), " (use mask.bool() or weight != 0)");
    TORCH_CHECK(
        m.sizes() == weight.sizes(), "sparse_adapt.", op, ": mask must have weight's shape ", shape_str(weight),
        ", got ", shape_str(m));
    TORCH_CHECK(
        m.device() == weight.device(), "sparse_adapt.", op, ": mask is on ", m.device(), " but weight is on ",
        weight.device());
  }
}

void check_linear_input(
    const char* op, const at::Tensor& x, const std::optional<at::Tensor>& bias, const at::Tensor& weight) {
  check_floating(op, "x", x);
  const int64_t in = weight.size(1), out = weight.size(0);
  TORCH_CHECK(
      x.dim() >= 1 && x.size(-1) == in, "sparse_adapt.", op, ": x must have shape (..., in) = (..., ", in,
      ") to match weight ", shape_str(weight), ", got ", shape_str(x));
  check_like(op, "x", x, "weight", weight);
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    check_floating(op, "bias", b);
    TORCH_CHECK(
        b.dim() == 1 && b.size(0) == out, "sparse_adapt.", op, ": bias must have shape (out,) = (", out,
        ",) to match weight ", shape_str(weight), ", got ", shape_str(b));
    check_like(op, "bias", b, "weight", weight);
  }
}

int64_t check_ema_topk_operands(
    const at::Tensor& param, const at::Tensor& grad, const at::Tensor& score, double beta, int64_t k, int64_t dim) {
  constexpr const char* op = "ema_topk_";
  check_floating(op, "param", param);
  check_floating(op, "grad", grad);
  TORCH_CHECK(param.dim() == 2, "sparse_adapt.", op, ": param must be 2-D, got shape ", shape_str(param));
  TORCH_CHECK(param.numel() > 0, "sparse_adapt.", op, ": param is empty, shape ", shape_str(param));
  TORCH_CHECK(
      grad.sizes() == param.sizes(), "sparse_adapt.", op, ": grad must have param's shape ", shape_str(param),
      ", got ", shape_str(grad));
  check_like(op, "grad", grad, "param", param);
  TORCH_CHECK(score.defined(), "sparse_adapt.", op, ": score is an undefined tensor");
  TORCH_CHECK(
      score.scalar_type() == at::kFloat, "sparse_adapt.", op, ": score must be float32 (it accumulates an EMA), got ",
      score.scalar_type());
  TORCH_CHECK(
      score.sizes() == param.sizes(), "sparse_adapt.", op, ": score must have param's shape ", shape_str(param),
      ", got ", shape_str(score));
  TORCH_CHECK(
      score.device() == param.device(), "sparse_adapt.", op, ": score is on ", score.device(), " but param is on ",
      param.device());
  TORCH_CHECK(
      !score.is_same(param) && !score.is_same(grad), "sparse_adapt.", op, ": score must be its own tensor");
  TORCH_CHECK_VALUE(
      dim >= -2 && dim <= 1, "sparse_adapt.", op, ": dim must be 0 (per column) or 1 (per row) of the 2-D param, got ",
      dim);
  TORCH_CHECK_VALUE(beta >= 0.0 && beta <= 1.0, "sparse_adapt.", op, ": beta must be in [0, 1], got ", beta);
  const int64_t d = dim < 0 ? dim + 2 : dim;
  const int64_t n = param.size(d);
  TORCH_CHECK_VALUE(
      k >= 0 && k <= n, "sparse_adapt.", op, ": k must be in [0, ", n, "] (the length of param ", shape_str(param),
      " along dim ", dim, "), got ", k);
  TORCH_CHECK(n <= 0xFFFFFFFFLL, "sparse_adapt.", op, ": slices longer than 2^32 entries are not supported");
  return d;
}

}  // namespace sparse_adapt
