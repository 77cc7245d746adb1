// CUDA launcher and registrations of masked_merge / masked_merge_ (the kernel: masked_merge_kernel.cuh).

#include "cuda/errors.h"
#include "cuda/masked_merge_kernel.cuh"
#include "ops.h"

#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

namespace sparse_adapt {
namespace {

using merge_cuda::FactorType;

FactorType factor_type(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return FactorType::kFloat;
    case at::kDouble:
      return FactorType::kDouble;
    case at::kHalf:
      return FactorType::kHalf;
    default:
      return FactorType::kBFloat16;  // the front-end admits only these four
  }
}

bool aligned(const void* p, size_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

template <typename w_t, typename out_t>
void launch_typed(
    const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale, const at::Tensor& mask,
    const at::Tensor& out) {
  using acc_t = at::opmath_type<out_t>;
  merge_cuda::MergeParams<w_t, out_t, acc_t> p;
  p.weight = weight.const_data_ptr<w_t>();
  p.lora_A = lora_A.const_data_ptr();
  p.lora_B = lora_B.const_data_ptr();
  p.mask = mask.defined() ? mask.const_data_ptr<bool>() : nullptr;
  p.out = out.mutable_data_ptr<out_t>();
  p.scale = static_cast<acc_t>(scale);
  p.rows = weight.size(0);
  p.cols = weight.size(1);
  p.r = lora_A.size(0);
  p.a_type = factor_type(lora_A);
  p.b_type = factor_type(lora_B);
  const bool vector_aligned = aligned(p.weight, 16) && aligned(p.out, 16) && (p.mask == nullptr || aligned(p.mask, 8));

  int device = 0, sms = 0;
  check_cuda(cudaGetDevice(&device), "masked_merge");
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "masked_merge");
  // The block count a wave holds depends on the kernel's registers and shared memory: ask the runtime.
  const merge_cuda::MergePlan first = merge_cuda::plan_merge(p.rows, p.cols, p.r, sizeof(acc_t), vector_aligned, 1);
  // The 16-byte path with or without a mask, and the scalar path (which reads the mask pointer at run time).
  const auto kernel = !first.vector       ? merge_cuda::masked_merge_kernel<w_t, out_t, acc_t, false, true>
                      : p.mask != nullptr ? merge_cuda::masked_merge_kernel<w_t, out_t, acc_t, true, true>
                                          : merge_cuda::masked_merge_kernel<w_t, out_t, acc_t, true, false>;
  if (first.smem_bytes > 48 * 1024) {
    check_cuda(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(first.smem_bytes)),
        "masked_merge");
  }
  int per_sm = 0;
  check_cuda(
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, merge_cuda::kThreads, first.smem_bytes),
      "masked_merge");
  const merge_cuda::MergePlan plan = merge_cuda::plan_merge(
      p.rows, p.cols, p.r, sizeof(acc_t), vector_aligned, static_cast<int64_t>(std::max(per_sm, 1)) * sms);
  p.rank_chunk = plan.rank_chunk;
  TORCH_CHECK(
      plan.col_strips <= 0x7fffffff, "sparse_adapt.masked_merge: weight of shape (", p.rows, ", ", p.cols,
      ") has too many columns for one CUDA launch");
  const dim3 grid(static_cast<unsigned>(plan.col_strips), static_cast<unsigned>(plan.grid_y));
  const dim3 block(merge_cuda::kThreadsX, merge_cuda::kThreadsY);
  kernel<<<grid, block, plan.smem_bytes, c10::cuda::getCurrentCUDAStream(device)>>>(p);
  check_launch("masked_merge");
}

void masked_merge_launch_cuda(
    const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale, const at::Tensor& mask,
    const at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::ScalarType w = weight.scalar_type(), o = out.scalar_type();
  if (w == at::kFloat && o == at::kBFloat16) {
    launch_typed<float, c10::BFloat16>(weight, lora_A, lora_B, scale, mask, out);
  } else if (w == at::kFloat && o == at::kHalf) {
    launch_typed<float, c10::Half>(weight, lora_A, lora_B, scale, mask, out);
  } else if (o == at::kFloat) {
    launch_typed<float, float>(weight, lora_A, lora_B, scale, mask, out);
  } else if (o == at::kDouble) {
    launch_typed<double, double>(weight, lora_A, lora_B, scale, mask, out);
  } else if (o == at::kHalf) {
    launch_typed<c10::Half, c10::Half>(weight, lora_A, lora_B, scale, mask, out);
  } else {
    launch_typed<c10::BFloat16, c10::BFloat16>(weight, lora_A, lora_B, scale, mask, out);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(sparse_adapt, CUDA, m) {
  bind_masked_merge<masked_merge_launch_cuda>(m);
}

}  // namespace sparse_adapt
