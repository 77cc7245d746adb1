// CUDA launcher and registrations of ema_topk_ / ema_topk_multi_ (the kernel: ema_topk_kernel.cuh).

#include "cuda/ema_topk_kernel.cuh"
#include "cuda/errors.h"
#include "ops.h"

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

namespace sparse_adapt {
namespace {

void ema_topk_launch_cuda(const std::vector<TopkMatrix>& matrices, double beta) {
  const c10::cuda::CUDAGuard guard(matrices.front().param.device());
  const int device = matrices.front().param.device().index();
  int sms = 0;
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "ema_topk_");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device);
  std::vector<topk_cuda::TopkSlices> slices;
  for (const TopkMatrix& m : matrices) {
    slices.push_back(
        {m.param.data_ptr(), m.grad.const_data_ptr(), m.score.mutable_data_ptr<float>(), m.layout.slices, m.layout.n,
         m.layout.slice_stride, m.layout.elem_stride, m.k, 0});
  }
  const auto launches = topk_cuda::plan_topk(slices, static_cast<float>(beta), sms);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, matrices.front().param.scalar_type(), "ema_topk_cuda", [&] {
    for (const topk_cuda::TopkLaunch& l : launches) {
      TORCH_CHECK(
          l.blocks <= 0x7fffffff, "sparse_adapt.ema_topk_: too many slices (", l.batch.slices, ") for one CUDA launch");
      const auto kernel =
          l.warp_teams ? topk_cuda::ema_topk_kernel<scalar_t, true> : topk_cuda::ema_topk_kernel<scalar_t, false>;
      kernel<<<static_cast<unsigned>(l.blocks), l.threads, 0, stream>>>(l.batch);
      check_launch("ema_topk_");
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(sparse_adapt, CUDA, m) {
  bind_ema_topk<ema_topk_launch_cuda>(m);
}

}  // namespace sparse_adapt
