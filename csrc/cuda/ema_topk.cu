// CUDA kernel of ema_topk_: one block per slice. The block updates the slice's EMA scores, then finds the k-th
// largest 64-bit key (kernels/ema_topk.h) by radix select, 8 bits per pass from the top, with a 256-bin
// histogram in shared memory; it stops as soon as the chosen bin holds exactly the entries still needed, which
// for untied scores is within the 32 score bits. A last pass zeroes the entries below the threshold.
//
// Each thread always visits the same entries (i = tid, tid + blockDim, ...), so the scores it rereads in later
// passes are ones it wrote itself; the barriers order the shared histogram.

#include "kernels/ema_topk.h"
#include "ops.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace sparse_adapt {
namespace {

constexpr int kThreads = 256;
constexpr int kBins = 256;

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) ema_topk_kernel(
    scalar_t* __restrict__ param,       // (rows, cols)
    const scalar_t* __restrict__ grad,  // (rows, cols)
    float* __restrict__ score,          // (rows, cols)
    float beta, int64_t k, int64_t n, int64_t slice_stride, int64_t elem_stride) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ unsigned int hist[kBins];
  __shared__ uint64_t prefix, prefix_mask;
  __shared__ int64_t remaining;
  __shared__ int done;

  const int64_t base = static_cast<int64_t>(blockIdx.x) * slice_stride;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) {
    const int64_t off = base + i * elem_stride;
    score[off] = kernels::ema_score<acc_t>(score[off], static_cast<acc_t>(param[off]), static_cast<acc_t>(grad[off]), beta);
  }
  if (k == n) {
    return;  // every entry is kept; k is the same for the whole block
  }
  if (threadIdx.x == 0) {
    prefix = 0;
    prefix_mask = 0;
    remaining = k;
    done = k == 0;  // k == 0: the threshold stays above every key
    if (k == 0) {
      prefix = ~uint64_t(0);
    }
  }
  __syncthreads();

  for (int shift = 56; shift >= 0 && !done; shift -= 8) {
    for (int b = threadIdx.x; b < kBins; b += kThreads) {
      hist[b] = 0;
    }
    __syncthreads();
    const uint64_t want = prefix, want_mask = prefix_mask;
    for (int64_t i = threadIdx.x; i < n; i += kThreads) {
      const uint64_t key = kernels::topk_key(score[base + i * elem_stride], i);
      if ((key & want_mask) == want) {
        atomicAdd(&hist[(key >> shift) & 0xFF], 1u);
      }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      // Walk the bins from the largest digit down until they hold the `remaining` largest candidates.
      int64_t above = 0;
      for (int d = kBins - 1; d >= 0; --d) {
        if (above + hist[d] >= remaining) {
          remaining -= above;
          prefix |= static_cast<uint64_t>(d) << shift;
          prefix_mask |= uint64_t(0xFF) << shift;
          done = hist[d] == remaining;  // the whole bin is kept: keys >= prefix (lower digits 0) are the top k
          break;
        }
        above += hist[d];
      }
    }
    __syncthreads();
  }

  const uint64_t threshold = prefix;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) {
    const int64_t off = base + i * elem_stride;
    if (kernels::topk_key(score[off], i) < threshold) {
      param[off] = scalar_t(0);
    }
  }
}

}  // namespace

void ema_topk_launch_cuda(
    const at::Tensor& param, const at::Tensor& grad, const at::Tensor& score, double beta, int64_t k,
    SliceLayout layout) {
  const c10::cuda::CUDAGuard guard(param.device());
  TORCH_CHECK(
      layout.slices <= 0x7fffffff, "sparse_adapt.ema_topk_: too many slices (", layout.slices,
      ") for one CUDA launch");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(param.device().index());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(), "ema_topk_cuda", [&] {
    ema_topk_kernel<scalar_t><<<static_cast<unsigned>(layout.slices), kThreads, 0, stream>>>(
        param.mutable_data_ptr<scalar_t>(), grad.const_data_ptr<scalar_t>(), score.mutable_data_ptr<float>(),
        static_cast<float>(beta), k, layout.n, layout.slice_stride, layout.elem_stride);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace sparse_adapt
