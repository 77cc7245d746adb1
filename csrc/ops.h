#pragma once
// Declarations of every sparse_adapt op. Schemas live in torch_bindings.cpp; semantics in ../shared/SPEC.md
// (README.md beside this file shows how one op flows from kernel to Python).

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>

namespace sparse_adapt {

// ---- backend launchers: contiguous operands, already checked -------------------------------------------------
// out (out, in) = weight (out, in) + scale * (lora_B (out, r) @ lora_A (r, in)) ⊙ M, M = mask (out, in) if
// defined else weight != 0. lora_A/lora_B are in the accumulation dtype (float32 for half types, else weight's).
// `out` may be `weight` itself (in place): each element is read before it is written, by the same thread.
using MergeLauncher = void (*)(
    const at::Tensor& weight,
    const at::Tensor& lora_A_acc,
    const at::Tensor& lora_B_acc,
    double scale,
    const at::Tensor& mask,
    const at::Tensor& out);

void masked_merge_launch_cpu(
    const at::Tensor& weight, const at::Tensor& lora_A_acc, const at::Tensor& lora_B_acc, double scale,
    const at::Tensor& mask, const at::Tensor& out);
#ifdef SPARSE_ADAPT_WITH_CUDA
void masked_merge_launch_cuda(
    const at::Tensor& weight, const at::Tensor& lora_A_acc, const at::Tensor& lora_B_acc, double scale,
    const at::Tensor& mask, const at::Tensor& out);
#endif

// ema_topk_ over `slices` slices of n entries each; entry i of slice j is at j * slice_stride + i * elem_stride
// of param, grad and score (all contiguous, same shape). Scores are float32.
struct SliceLayout {
  int64_t slices, n, slice_stride, elem_stride;
};
using EmaTopkLauncher = void (*)(
    const at::Tensor& param, const at::Tensor& grad, const at::Tensor& score, double beta, int64_t k,
    SliceLayout layout);

void ema_topk_launch_cpu(
    const at::Tensor& param, const at::Tensor& grad, const at::Tensor& score, double beta, int64_t k,
    SliceLayout layout);
#ifdef SPARSE_ADAPT_WITH_CUDA
void ema_topk_launch_cuda(
    const at::Tensor& param, const at::Tensor& grad, const at::Tensor& score, double beta, int64_t k,
    SliceLayout layout);
#endif

// ---- masked_merge / masked_merge_ (ops/masked_merge.cpp), bound to a backend's launcher ----------------------
at::Tensor masked_merge(
    MergeLauncher launch, const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
    double scale, const std::optional<at::Tensor>& mask);
void masked_merge_(
    MergeLauncher launch, const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
    double scale, const std::optional<at::Tensor>& mask);

// ---- ema_topk_ (ops/ema_topk.cpp), bound to a backend's launcher ------------------------------------------------
void ema_topk_(
    EmaTopkLauncher launch, const at::Tensor& param, const at::Tensor& grad, const at::Tensor& score, double beta,
    int64_t k, int64_t dim);

// ---- device-generic ops: the merge through the dispatcher, GEMMs through ATen ---------------------------------
// (grad_A, grad_B) of merged w.r.t. lora_A, lora_B given grad (out, in) of merged; output_mask = (A, B).
std::tuple<at::Tensor, at::Tensor> masked_merge_backward(
    const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
    double scale, const std::optional<at::Tensor>& mask, std::array<bool, 2> output_mask);

at::Tensor masked_lora_linear(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
    const at::Tensor& lora_B, double scale, const std::optional<at::Tensor>& mask, bool exact_grad);

// (grad_x, grad_weight, grad_bias, grad_A, grad_B); output_mask selects which are computed, the others are
// returned as empty tensors of shape (0,).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> masked_lora_linear_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, double scale, const std::optional<at::Tensor>& mask, bool exact_grad,
    std::array<bool, 5> output_mask);

// Registers the device-generic ops above for the backend whose TORCH_LIBRARY_IMPL block calls it.
void register_device_generic_ops(torch::Library& m);

// Everything a backend registers: the kernel ops bound to its launchers, and the device-generic ops.
template <MergeLauncher launch, EmaTopkLauncher launch_ema_topk>
void register_backend_ops(torch::Library& m) {
  m.impl(
      "masked_merge",
      +[](const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale,
          const std::optional<at::Tensor>& mask) { return masked_merge(launch, weight, lora_A, lora_B, scale, mask); });
  m.impl(
      "masked_merge_",
      +[](const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale,
          const std::optional<at::Tensor>& mask) { masked_merge_(launch, weight, lora_A, lora_B, scale, mask); });
  m.impl(
      "ema_topk_",
      +[](const at::Tensor& param, const at::Tensor& grad, const at::Tensor& score, double beta, int64_t k,
          int64_t dim) { ema_topk_(launch_ema_topk, param, grad, score, beta, k, dim); });
  register_device_generic_ops(m);
}

}  // namespace sparse_adapt
