// CUDA kernel of the masked merge.
//
// Each 256-thread block owns a 32 x 128 tile of weight. It stages the tile's slice of lora_B rows and lora_A
// columns in shared memory (32 ranks at a time, in float), accumulates the 32 x 128 low-rank delta in
// registers (4 x 4 per thread), then reads weight and writes the result once. Weight traffic is one read and
// one write per element, so the kernel is bandwidth-bound for the ranks LoRA uses; lora_A/lora_B are re-read
// per tile but they are small and stay in L2.

#include "kernels/masked_merge.h"
#include "ops.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace sparse_adapt {
namespace {

constexpr int kThreadsX = 32;  // one warp spans the tile's columns: coalesced weight reads and writes
constexpr int kThreadsY = 8;
constexpr int kTileRows = 32;
constexpr int kTileCols = 128;
constexpr int kRankChunk = 32;
constexpr int kRowsPerThread = kTileRows / kThreadsY;
constexpr int kColsPerThread = kTileCols / kThreadsX;

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreadsX* kThreadsY) masked_merge_kernel(
    const scalar_t* weight,              // (rows, cols); may alias out, so not __restrict__
    const acc_t* __restrict__ lora_A,    // (r, cols)
    const acc_t* __restrict__ lora_B,    // (rows, r)
    const bool* __restrict__ mask,       // (rows, cols) or nullptr: M = weight != 0
    acc_t scale,
    scalar_t* out,                       // (rows, cols)
    int64_t rows, int64_t cols, int64_t r) {
  // +1 column of padding: the staging writes of b_tile walk k fastest, so rows would collide on one bank.
  __shared__ acc_t b_tile[kTileRows][kRankChunk + 1];
  __shared__ acc_t a_tile[kRankChunk][kTileCols];

  const int tx = threadIdx.x, ty = threadIdx.y;
  const int tid = ty * kThreadsX + tx;
  const int64_t row0 = static_cast<int64_t>(blockIdx.y) * kTileRows;
  const int64_t col0 = static_cast<int64_t>(blockIdx.x) * kTileCols;

  acc_t acc[kRowsPerThread][kColsPerThread];
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
#pragma unroll
    for (int j = 0; j < kColsPerThread; ++j) {
      acc[i][j] = acc_t(0);
    }
  }

  for (int64_t k0 = 0; k0 < r; k0 += kRankChunk) {
    const int kn = static_cast<int>(min(static_cast<int64_t>(kRankChunk), r - k0));
    for (int e = tid; e < kTileRows * kRankChunk; e += kThreadsX * kThreadsY) {
      const int i = e / kRankChunk, k = e % kRankChunk;
      const int64_t row = row0 + i;
      b_tile[i][k] = (row < rows && k < kn) ? lora_B[row * r + k0 + k] : acc_t(0);
    }
    for (int e = tid; e < kRankChunk * kTileCols; e += kThreadsX * kThreadsY) {
      const int k = e / kTileCols, j = e % kTileCols;
      const int64_t col = col0 + j;
      a_tile[k][j] = (k < kn && col < cols) ? lora_A[(k0 + k) * cols + col] : acc_t(0);
    }
    __syncthreads();
    for (int k = 0; k < kn; ++k) {
      acc_t a[kColsPerThread], b[kRowsPerThread];
#pragma unroll
      for (int j = 0; j < kColsPerThread; ++j) {
        a[j] = a_tile[k][tx + j * kThreadsX];
      }
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) {
        b[i] = b_tile[ty + i * kThreadsY][k];  // one address per warp: a broadcast
      }
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) {
#pragma unroll
        for (int j = 0; j < kColsPerThread; ++j) {
          acc[i][j] += b[i] * a[j];
        }
      }
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    const int64_t row = row0 + ty + i * kThreadsY;
    if (row >= rows) {
      continue;
    }
#pragma unroll
    for (int j = 0; j < kColsPerThread; ++j) {
      const int64_t col = col0 + tx + j * kThreadsX;
      if (col < cols) {
        const int64_t idx = row * cols + col;
        out[idx] = kernels::merged_value(weight[idx], acc[i][j], scale, mask, idx);
      }
    }
  }
}

}  // namespace

void masked_merge_launch_cuda(
    const at::Tensor& weight, const at::Tensor& lora_A_acc, const at::Tensor& lora_B_acc, double scale,
    const at::Tensor& mask, const at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(weight.device());
  const int64_t rows = weight.size(0), cols = weight.size(1), r = lora_A_acc.size(0);
  const int64_t row_tiles = (rows + kTileRows - 1) / kTileRows;
  const int64_t col_tiles = (cols + kTileCols - 1) / kTileCols;
  TORCH_CHECK(
      row_tiles <= 65535 && col_tiles <= 0x7fffffff, "sparse_adapt.masked_merge: weight of shape (", rows, ", ",
      cols, ") is too large for one CUDA launch (at most ", 65535 * kTileRows, " rows)");
  const dim3 grid(static_cast<unsigned>(col_tiles), static_cast<unsigned>(row_tiles));
  const dim3 block(kThreadsX, kThreadsY);
  const bool* mask_ptr = mask.defined() ? mask.const_data_ptr<bool>() : nullptr;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(weight.device().index());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "masked_merge_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    masked_merge_kernel<scalar_t, acc_t><<<grid, block, 0, stream>>>(
        weight.const_data_ptr<scalar_t>(), lora_A_acc.const_data_ptr<acc_t>(), lora_B_acc.const_data_ptr<acc_t>(),
        mask_ptr, static_cast<acc_t>(scale), out.mutable_data_ptr<scalar_t>(), rows, cols, r);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace sparse_adapt
