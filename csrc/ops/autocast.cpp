// masked_lora_linear under torch.autocast (CPU and CUDA): what autocast does for F.linear -- x and bias in the
// autocast dtype, computed in it -- except that weight and the adapters are *not* cast: the merge reads them in
// their own dtypes and writes the merged weight in the compute dtype, so there is no separate cast pass, and fp32
// parameters get fp32 gradients. float64 inputs are left alone, as autocast leaves them.

#include "ops.h"

#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace sparse_adapt {
namespace {

template <c10::DeviceType kDevice>
at::Tensor masked_lora_linear_autocast(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
    const at::Tensor& lora_B, double scale, const std::optional<at::Tensor>& mask, bool exact_grad,
    std::optional<at::ScalarType> compute_dtype) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(
      at::autocast::get_autocast_dispatch_key_from_device_type(kDevice));
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("sparse_adapt::masked_lora_linear", "")
                       .typed<decltype(masked_lora_linear)>();
  const bool eligible = !compute_dtype.has_value() && x.scalar_type() != at::kDouble &&
                        weight.scalar_type() != at::kDouble && x.device().type() == kDevice;
  if (!eligible) {
    return op.call(x, weight, bias, lora_A, lora_B, scale, mask, exact_grad, compute_dtype);
  }
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(kDevice);
  const at::Tensor x_cast = at::autocast::cached_cast(dtype, x, kDevice);
  return op.call(
      x_cast, weight, at::autocast::cached_cast(dtype, bias, kDevice), lora_A, lora_B, scale, mask, exact_grad, dtype);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparse_adapt, AutocastCPU, m) {
  m.impl("masked_lora_linear", &masked_lora_linear_autocast<c10::DeviceType::CPU>);
}

TORCH_LIBRARY_IMPL(sparse_adapt, AutocastCUDA, m) {
  m.impl("masked_lora_linear", &masked_lora_linear_autocast<c10::DeviceType::CUDA>);
}

}  // namespace sparse_adapt
