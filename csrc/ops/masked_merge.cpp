// Front-ends of masked_merge / masked_merge_: checks, contiguity, the accumulation dtype, then one launch.

#include "common/checks.h"
#include "ops.h"

#include <ATen/OpMathType.h>
#include <ATen/ops/empty_like.h>

namespace sparse_adapt {
namespace {

// Low-rank factors in the accumulation dtype: O(r * (in + out)) floats, never O(out * in).
at::Tensor to_acc(const at::Tensor& t) {
  return t.to(at::toOpMathType(t.scalar_type())).contiguous();
}

at::Tensor mask_or_undefined(const std::optional<at::Tensor>& mask) {
  return mask.has_value() ? mask->contiguous() : at::Tensor();
}

}  // namespace

at::Tensor masked_merge(
    MergeLauncher launch, const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
    double scale, const std::optional<at::Tensor>& mask) {
  check_lora_operands("masked_merge", weight, lora_A, lora_B, scale, mask);
  at::Tensor w = weight.contiguous();
  at::Tensor out = at::empty_like(w, at::MemoryFormat::Contiguous);
  launch(w, to_acc(lora_A), to_acc(lora_B), scale, mask_or_undefined(mask), out);
  return out;
}

void masked_merge_(
    MergeLauncher launch, const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
    double scale, const std::optional<at::Tensor>& mask) {
  check_lora_operands("masked_merge_", weight, lora_A, lora_B, scale, mask);
  if (weight.is_contiguous()) {
    launch(weight, to_acc(lora_A), to_acc(lora_B), scale, mask_or_undefined(mask), weight);
    return;
  }
  at::Tensor w = weight.contiguous();
  launch(w, to_acc(lora_A), to_acc(lora_B), scale, mask_or_undefined(mask), w);
  weight.copy_(w);
}

}  // namespace sparse_adapt
