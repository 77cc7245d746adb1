#pragma once
// Argument checks shared by every op. Each message names the op, the argument and what was expected:
// these messages are what a user sees when an adapter is wired to the wrong layer.

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>

namespace sparse_adapt {

// "(4, 8)" for a 4x8 tensor.
std::string shape_str(const at::Tensor& t);

// A defined tensor of dtype float32/float64/float16/bfloat16.
void check_floating(const char* op, const char* name, const at::Tensor& t);

// `t` lives on `ref`'s device and has its dtype.
void check_like(const char* op, const char* name, const at::Tensor& t, const char* ref_name, const at::Tensor& ref);

// weight (out, in), lora_A (r, in), lora_B (out, r), mask (out, in) bool, scale finite: the operands of every
// masked low-rank op. Empty weights and rank 0 are rejected: there is nothing to adapt.
void check_lora_operands(
    const char* op,
    const at::Tensor& weight,
    const at::Tensor& lora_A,
    const at::Tensor& lora_B,
    double scale,
    const std::optional<at::Tensor>& mask);

// x (..., in) and bias (out) of a linear layer whose weight is (out, in).
void check_linear_input(
    const char* op, const at::Tensor& x, const std::optional<at::Tensor>& bias, const at::Tensor& weight);

// param (n0, n1) floating, grad like param, score float32 of param's shape, beta in [0, 1], dim in {0, 1, -1, -2},
// k in [0, n] with n = param.size(dim). Returns dim made non-negative.
int64_t check_ema_topk_operands(
    const at::Tensor& param, const at::Tensor& grad, const at::Tensor& score, double beta, int64_t k, int64_t dim);

}  // namespace sparse_adapt
