// Front-ends of masked_merge / masked_merge_: checks, contiguity, the output dtype, then one launch of the
// backend's kernel (bound in cpu/masked_merge.cpp, cuda/masked_merge.cu).

#include "common/checks.h"
#include "ops.h"

#include <ATen/ops/empty.h>

namespace sparse_adapt {
namespace {

at::Tensor mask_or_undefined(const std::optional<at::Tensor>& mask) {
  return mask.has_value() ? mask->contiguous() : at::Tensor();
}

}  // namespace

bool merge_reads_natively(at::ScalarType weight, at::ScalarType out) {
  // The kernels convert while they read; these are the pairs they are built for: one dtype throughout, and an fp32
  // weight merged straight into the half-precision compute dtype of autocast.
  return weight == out || (weight == at::kFloat && (out == at::kHalf || out == at::kBFloat16));
}

at::Tensor masked_merge(
    MergeLauncher launch, const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale,
    const std::optional<at::Tensor>& mask, std::optional<at::ScalarType> out_dtype) {
  check_lora_operands("masked_merge", weight, lora_A, lora_B, scale, mask, /*mixed=*/out_dtype.has_value());
  const at::ScalarType dtype = out_dtype.value_or(weight.scalar_type());
  check_floating_dtype("masked_merge", "out_dtype", dtype);
  at::Tensor w = weight.contiguous();
  if (!merge_reads_natively(w.scalar_type(), dtype)) {
    w = w.to(dtype);  // an unusual pair (e.g. a bf16 weight into fp16): one conversion pass first
  }
  at::Tensor out = at::empty(w.sizes(), w.options().dtype(dtype));
  launch(w, lora_A.contiguous(), lora_B.contiguous(), scale, mask_or_undefined(mask), out);
  return out;
}

void masked_merge_(
    MergeLauncher launch, const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale,
    const std::optional<at::Tensor>& mask) {
  check_lora_operands("masked_merge_", weight, lora_A, lora_B, scale, mask);
  const at::Tensor no_mask;
  check_in_place_operands(
      "masked_merge_", {{&weight, "weight", -1, true},
                        {&lora_A, "lora_A", -1, false},
                        {&lora_B, "lora_B", -1, false},
                        {mask.has_value() ? &*mask : &no_mask, "mask", -1, false}});
  const at::Tensor a = lora_A.contiguous(), b = lora_B.contiguous();
  if (weight.is_contiguous()) {
    launch(weight, a, b, scale, mask_or_undefined(mask), weight);
  } else {
    at::Tensor w = weight.contiguous();
    launch(w, a, b, scale, mask_or_undefined(mask), w);
    weight.copy_(w);
  }
  bump_version(weight);
}

}  // namespace sparse_adapt
