// The one schema block of the sparse_adapt library. Kernels register themselves beside their code (cpu/, cuda/,
// ops/); fakes and autograd are registered from Python (sparse_adapt/ops.py). Semantics: docs/ops.md.

#include <ATen/core/enum_tag.h>
#include <torch/library.h>

TORCH_LIBRARY(sparse_adapt, m) {
  const std::vector<at::Tag> tags = {at::Tag::pt2_compliant_tag};
  // weight + scale * (lora_B @ lora_A) ⊙ M, in one pass over weight; M = mask or weight != 0. out_dtype: the
  // result's dtype (default weight's); with it, the operands may be stored in any floating dtypes.
  m.def(
      "masked_merge(Tensor weight, Tensor lora_A, Tensor lora_B, float scale, Tensor? mask=None, "
      "ScalarType? out_dtype=None) -> Tensor",
      tags);
  // The same, in place: merge, or unmerge with -scale. Never turns a zero of M into a non-zero.
  m.def("masked_merge_(Tensor(a!) weight, Tensor lora_A, Tensor lora_B, float scale, Tensor? mask=None) -> ()", tags);
  // (grad_lora_A, grad_lora_B) of masked_merge; output_mask = which of the two to compute.
  m.def(
      "masked_merge_backward(Tensor grad, Tensor weight, Tensor lora_A, Tensor lora_B, float scale, Tensor? mask, "
      "bool[2] output_mask) -> (Tensor, Tensor)",
      tags);
  // x @ masked_merge(...)ᵀ + bias, saving only its inputs for backward (LoRS). compute_dtype: mixed precision (what
  // the op's autocast kernel passes): x is in it, the other operands in any floating dtype.
  m.def(
      "masked_lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float scale, "
      "Tensor? mask=None, bool exact_grad=False, ScalarType? compute_dtype=None) -> Tensor",
      tags);
  // (grad_x, grad_weight, grad_bias, grad_lora_A, grad_lora_B); those not in output_mask come back with shape (0,).
  m.def(
      "masked_lora_linear_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, "
      "float scale, Tensor? mask, bool exact_grad, bool[5] output_mask, ScalarType? compute_dtype=None) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor)",
      tags);
  // score ← beta·score + (1−beta)·|param ⊙ grad|; then every slice of param along dim keeps its k entries of
  // largest score (ties: lower index) and the rest are zeroed. RoseLoRA: dim=1 on lora_A, dim=0 on lora_B.
  m.def("ema_topk_(Tensor(a!) param, Tensor grad, Tensor(b!) score, float beta, int k, int dim) -> ()", tags);
  // ema_topk_ on many matrices in one call (one launch per 48 matrices on CUDA): params[i] keeps ks[i] per slice
  // along dims[i]. What RoseLoraPruner.step calls.
  m.def(
      "ema_topk_multi_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] scores, float beta, int[] ks, int[] dims) "
      "-> ()",
      tags);
}
