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

}  // namespace sparse_adapt
