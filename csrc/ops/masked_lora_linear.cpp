// Ops without device code, registered once for every backend (CompositeExplicitAutograd: autograd is registered
// from Python): the merge goes through the dispatcher, so it reaches the CPU or CUDA kernel, the GEMMs through ATen
// (MKL / cuBLAS). Nothing here allocates O(out * in) except the merged weight, which lives only for one GEMM, and
// the exact-gradient path's masked dense gradient, which exists only inside backward.
//
// Mixed precision (compute_dtype, what autocast passes): x, the output and the GEMMs are in the compute dtype; the
// merge reads weight, lora_A and lora_B in their own dtypes and writes the merged weight in the compute dtype; each
// gradient comes back in its operand's dtype (fp32 parameters get fp32 gradients).

#include "common/checks.h"
#include "ops.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

namespace sparse_adapt {
namespace {

at::Tensor call_masked_merge(
    const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale,
    const std::optional<at::Tensor>& mask, std::optional<at::ScalarType> out_dtype) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("sparse_adapt::masked_merge", "")
                       .typed<at::Tensor(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                           const std::optional<at::Tensor>&, std::optional<at::ScalarType>)>();
  return op.call(weight, lora_A, lora_B, scale, mask, out_dtype);
}

// grad_A = s · Bᵀ (G ⊙ M), grad_B = s · (G ⊙ M) Aᵀ, in G's dtype, returned in the factors' dtypes. `dense_grad`
// (out, in) is consumed (masked in place).
std::tuple<at::Tensor, at::Tensor> masked_lowrank_grads(
    at::Tensor dense_grad, const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale,
    const std::optional<at::Tensor>& mask, std::array<bool, 2> output_mask) {
  dense_grad.mul_(mask.has_value() ? *mask : weight.ne(0));
  const at::ScalarType dtype = dense_grad.scalar_type();
  at::Tensor gA = output_mask[0] ? at::mm(lora_B.to(dtype).t(), dense_grad).mul_(scale).to(lora_A.scalar_type())
                                 : at::empty({0}, lora_A.options());
  at::Tensor gB = output_mask[1] ? at::mm(dense_grad, lora_A.to(dtype).t()).mul_(scale).to(lora_B.scalar_type())
                                 : at::empty({0}, lora_B.options());
  return {gA, gB};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> masked_merge_backward(
    const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale,
    const std::optional<at::Tensor>& mask, std::array<bool, 2> output_mask) {
  constexpr const char* op = "masked_merge_backward";
  check_lora_operands(op, weight, lora_A, lora_B, scale, mask, /*mixed=*/true);
  check_floating(op, "grad", grad);
  check_like(op, "grad", grad, "weight", weight, /*any_dtype=*/true);
  TORCH_CHECK(
      grad.sizes() == weight.sizes(), "sparse_adapt.", op, ": grad must have weight's shape ", shape_str(weight),
      ", got ", shape_str(grad));
  return masked_lowrank_grads(grad.clone(), weight, lora_A, lora_B, scale, mask, output_mask);
}

at::Tensor masked_lora_linear(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
    const at::Tensor& lora_B, double scale, const std::optional<at::Tensor>& mask, bool /*exact_grad*/,
    std::optional<at::ScalarType> compute_dtype) {
  constexpr const char* op = "masked_lora_linear";
  check_lora_operands(op, weight, lora_A, lora_B, scale, mask, /*mixed=*/compute_dtype.has_value());
  check_linear_input(op, x, bias, weight, compute_dtype);
  const at::ScalarType dtype = compute_dtype.value_or(weight.scalar_type());
  const at::Tensor merged = call_masked_merge(weight, lora_A, lora_B, scale, mask, compute_dtype);
  return at::linear(x, merged, bias.has_value() ? std::optional<at::Tensor>(bias->to(dtype)) : std::nullopt);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> masked_lora_linear_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, double scale, const std::optional<at::Tensor>& mask, bool exact_grad,
    std::array<bool, 5> output_mask, std::optional<at::ScalarType> compute_dtype) {
  constexpr const char* op = "masked_lora_linear_backward";
  check_lora_operands(op, weight, lora_A, lora_B, scale, mask, /*mixed=*/compute_dtype.has_value());
  check_linear_input(op, x, std::nullopt, weight, compute_dtype);
  check_floating(op, "grad_out", grad_out);
  check_like(op, "grad_out", grad_out, "x", x);
  const int64_t out = weight.size(0), in = weight.size(1);
  auto expected = x.sizes().vec();
  expected.back() = out;
  TORCH_CHECK(
      grad_out.sizes() == at::IntArrayRef(expected), "sparse_adapt.", op,
      ": grad_out must have shape (..., out) = ", at::IntArrayRef(expected), " to match x ", shape_str(x),
      " and weight ", shape_str(weight), ", got ", shape_str(grad_out));

  const at::ScalarType dtype = compute_dtype.value_or(weight.scalar_type());
  const auto [need_x, need_w, need_bias, need_A, need_B] = output_mask;
  // x is read only for the weight and adapter gradients; when none is wanted the caller may pass a stride-0
  // placeholder of x's shape, which must not be materialized.
  const at::Tensor x2 = (need_w || need_A || need_B) ? x.reshape({-1, in}) : at::Tensor();  // (L, in)
  const at::Tensor g2 = grad_out.reshape({-1, out});                                        // (L, out)
  const auto none = [&](const at::Tensor& like) { return at::empty({0}, like.options()); };
  at::Tensor gx = none(x), gW = none(weight), gbias = none(x), gA = none(lora_A), gB = none(lora_B);

  if (need_x) {
    // The merged weight is recomputed here rather than saved by forward: one (out, in) buffer, alive only for
    // this GEMM.
    gx = at::mm(g2, call_masked_merge(weight, lora_A, lora_B, scale, mask, compute_dtype)).reshape(x.sizes());
  }
  const bool exact_lowrank = exact_grad && (need_A || need_B);
  at::Tensor dense_grad;  // gyᵀ x (out, in): the true weight gradient, in the compute dtype
  if (need_w || exact_lowrank) {
    dense_grad = at::mm(g2.t(), x2);
  }
  if (need_w) {
    gW = dense_grad.to(weight.scalar_type());
  }
  if (need_bias) {
    gbias = g2.sum(0);
  }
  if (exact_lowrank) {
    std::tie(gA, gB) = masked_lowrank_grads(
        need_w && gW.is_same(dense_grad) ? dense_grad.clone() : dense_grad, weight, lora_A, lora_B, scale, mask,
        {need_A, need_B});
  } else {
    // LoRS's straight-through estimate, reordered so that nothing of size (out, in) is formed:
    // grad_A = s (gy B)ᵀ x costs O(L r (out + in)), not O(L out in).
    if (need_A) {
      gA = at::mm(at::mm(g2, lora_B.to(dtype)).t(), x2).mul_(scale).to(lora_A.scalar_type());
    }
    if (need_B) {
      gB = at::mm(g2.t(), at::mm(x2, lora_A.to(dtype).t())).mul_(scale).to(lora_B.scalar_type());
    }
  }
  return {gx, gW, gbias, gA, gB};
}

TORCH_LIBRARY_IMPL(sparse_adapt, CompositeExplicitAutograd, m) {
  m.impl("masked_merge_backward", &masked_merge_backward);
  m.impl("masked_lora_linear", &masked_lora_linear);
  m.impl("masked_lora_linear_backward", &masked_lora_linear_backward);
}

}  // namespace sparse_adapt
