#pragma once
// Declarations of every sparse_adapt op. Schemas live in torch_bindings.cpp, their semantics in docs/ops.md;
// README.md beside this file shows how one op flows from kernel to Python.
//
// An op with device code has a device-generic front-end here (checks, layout, dtypes) that takes the backend's
// launcher as its first argument; each cpu/<op>.cpp and cuda/<op>.cu registers its own kernels by binding its
// launcher to that front-end. Ops without device code (ops/masked_lora_linear.cpp) are registered once, for
// every backend.

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

namespace sparse_adapt {

// ---- masked_merge / masked_merge_ ----------------------------------------------------------------------------
// out (out, in) = weight (out, in) + scale * (lora_B (out, r) @ lora_A (r, in)) ⊙ M, M = mask (out, in) if defined
// else weight != 0. All contiguous. lora_A and lora_B may be stored in any floating dtype (they are read in their
// own dtype and accumulated in at::opmath_type of out's dtype); weight and out have the same dtype, or weight is
// float32 and out float16/bfloat16 (see merge_reads_natively). `out` may be `weight` itself (in place): each
// element is read before it is written, by the same thread.
using MergeLauncher = void (*)(
    const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale, const at::Tensor& mask,
    const at::Tensor& out);

// Whether the kernels read a weight of dtype `weight` and write `out` directly; other pairs are converted first.
bool merge_reads_natively(at::ScalarType weight, at::ScalarType out);

at::Tensor masked_merge(
    MergeLauncher launch, const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale,
    const std::optional<at::Tensor>& mask, std::optional<at::ScalarType> out_dtype);
void masked_merge_(
    MergeLauncher launch, const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale,
    const std::optional<at::Tensor>& mask);

// What a backend's TORCH_LIBRARY_IMPL block calls to register its merge kernel for masked_merge and masked_merge_.
template <MergeLauncher launch>
void bind_masked_merge(torch::Library& m) {
  m.impl(
      "masked_merge", [](const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale,
                         const std::optional<at::Tensor>& mask, std::optional<at::ScalarType> out_dtype) {
        return masked_merge(launch, weight, lora_A, lora_B, scale, mask, out_dtype);
      });
  m.impl(
      "masked_merge_",
      [](const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale,
         const std::optional<at::Tensor>& mask) { masked_merge_(launch, weight, lora_A, lora_B, scale, mask); });
}

// ---- ema_topk_ / ema_topk_multi_ -----------------------------------------------------------------------------
// Entry i of slice j of a matrix is at j * slice_stride + i * elem_stride of its param, grad and score.
struct SliceLayout {
  int64_t slices, n, slice_stride, elem_stride;
};

// One matrix of an ema_topk_ call: param, grad (param's dtype) and score (float32), all contiguous, and the k
// entries each slice keeps.
struct TopkMatrix {
  at::Tensor param, grad, score;
  SliceLayout layout;
  int64_t k;
};

// Every matrix on one device with one param dtype; all of them are updated by the one call.
using EmaTopkLauncher = void (*)(const std::vector<TopkMatrix>& matrices, double beta);

void ema_topk_(
    EmaTopkLauncher launch, const at::Tensor& param, const at::Tensor& grad, const at::Tensor& score, double beta,
    int64_t k, int64_t dim);
void ema_topk_multi_(
    EmaTopkLauncher launch, at::TensorList params, at::TensorList grads, at::TensorList scores, double beta,
    at::IntArrayRef ks, at::IntArrayRef dims);

// What a backend's TORCH_LIBRARY_IMPL block calls to register its kernel for ema_topk_ and ema_topk_multi_.
template <EmaTopkLauncher launch>
void bind_ema_topk(torch::Library& m) {
  m.impl(
      "ema_topk_", [](const at::Tensor& param, const at::Tensor& grad, const at::Tensor& score, double beta, int64_t k,
                      int64_t dim) { ema_topk_(launch, param, grad, score, beta, k, dim); });
  m.impl(
      "ema_topk_multi_",
      [](at::TensorList params, at::TensorList grads, at::TensorList scores, double beta, at::IntArrayRef ks,
         at::IntArrayRef dims) { ema_topk_multi_(launch, params, grads, scores, beta, ks, dims); });
}

// ---- device-generic ops (ops/masked_lora_linear.cpp): the merge through the dispatcher, GEMMs through ATen -----
// (grad_A, grad_B) of merged w.r.t. lora_A, lora_B given grad (out, in) of merged; output_mask = (A, B). Each
// gradient has its factor's dtype.
std::tuple<at::Tensor, at::Tensor> masked_merge_backward(
    const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale,
    const std::optional<at::Tensor>& mask, std::array<bool, 2> output_mask);

// compute_dtype: the dtype x is in and the output is computed in (mixed precision: weight, lora_A, lora_B and bias
// may then be stored in other floating dtypes); nullopt: every operand has weight's dtype.
at::Tensor masked_lora_linear(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
    const at::Tensor& lora_B, double scale, const std::optional<at::Tensor>& mask, bool exact_grad,
    std::optional<at::ScalarType> compute_dtype);

// (grad_x, grad_weight, grad_bias, grad_A, grad_B); output_mask selects which are computed, the others are
// returned as empty tensors of shape (0,). grad_x and grad_bias are in the compute dtype, the others in the dtype
// of the operand they belong to.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> masked_lora_linear_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, double scale, const std::optional<at::Tensor>& mask, bool exact_grad,
    std::array<bool, 5> output_mask, std::optional<at::ScalarType> compute_dtype);

}  // namespace sparse_adapt
