#pragma once
// Argument checks shared by every op. Each message names the op, the argument and what was expected:
// these messages are what a user sees when an adapter is wired to the wrong layer.

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>
#include <vector>

namespace sparse_adapt {

// "(4, 8)" for a 4x8 tensor.
std::string shape_str(const at::Tensor& t);

// A defined tensor of dtype float32/float64/float16/bfloat16.
void check_floating(const char* op, const char* name, const at::Tensor& t);

// `t` lives on `ref`'s device and has its dtype (any floating dtype when `any_dtype`).
void check_like(
    const char* op, const char* name, const at::Tensor& t, const char* ref_name, const at::Tensor& ref,
    bool any_dtype = false);

// weight (out, in), lora_A (r, in), lora_B (out, r), mask (out, in) bool, scale finite: the operands of every
// masked low-rank op. Empty weights and rank 0 are rejected: there is nothing to adapt. `mixed`: lora_A and
// lora_B may have another floating dtype than weight (mixed precision); otherwise they must have weight's.
void check_lora_operands(
    const char* op, const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale,
    const std::optional<at::Tensor>& mask, bool mixed = false);

// x (..., in) and bias (out) of a linear layer whose weight is (out, in). Without a compute dtype x and bias have
// weight's dtype; with one, x has it and bias is any floating dtype.
void check_linear_input(
    const char* op, const at::Tensor& x, const std::optional<at::Tensor>& bias, const at::Tensor& weight,
    std::optional<at::ScalarType> compute_dtype = std::nullopt);

// A floating dtype requested for a result (out_dtype, compute_dtype).
void check_floating_dtype(const char* op, const char* name, at::ScalarType dtype);

// param (n0, n1) floating, grad like param, score float32 of param's shape, beta in [0, 1], dim in {0, 1, -1, -2},
// k in [0, n] with n = param.size(dim). Returns dim made non-negative. `index` >= 0 names the matrix of a
// multi-tensor call in the messages ("params[3]").
int64_t check_ema_topk_operands(
    const char* op, const at::Tensor& param, const at::Tensor& grad, const at::Tensor& score, double beta, int64_t k,
    int64_t dim, int64_t index = -1);

// One tensor operand of an in-place op: its name in messages ("weight", or "params[3]" with index 3) and whether
// the op writes it.
struct InPlaceOperand {
  const at::Tensor* tensor;
  const char* name;
  int64_t index;  // -1: the name alone
  bool written;

  std::string display_name() const;
};

// What torch's own in-place ops refuse, for the operands of an op that writes some of them (masked_merge_,
// ema_topk_, ema_topk_multi_), checked before anything is written:
// - with grad mode on, any operand that requires grad (the op is not differentiable: the write would be invisible
//   to autograd, or a gradient would be dropped silently) -- call it under torch.no_grad();
// - a written inference tensor outside torch.inference_mode();
// - a written tensor whose elements overlap (an expanded view);
// - a written tensor sharing memory with any other operand (a view of another operand).
void check_in_place_operands(const char* op, const std::vector<InPlaceOperand>& operands);

// Tells autograd that `t` was modified in place (what every in-place ATen op does), so that a tensor saved for a
// backward and then written by a sparse_adapt op is detected when that backward runs.
void bump_version(const at::Tensor& t);

}  // namespace sparse_adapt
