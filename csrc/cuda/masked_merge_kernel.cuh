#pragma once
// CUDA kernel of the masked merge  out = weight + scale * (lora_B @ lora_A) ⊙ M  (launched by cuda/masked_merge.cu).
//
// The data path is what the kernel's speed is made of: it moves each weight element once in and once out, so it
// is bound by memory bandwidth at the ranks LoRA uses.
//  - A block of 32 x 8 threads owns a strip of 256 columns. Each thread owns 4 rows x 8 contiguous columns of a
//    32 x 256 row tile: 8 contiguous elements are whole 16-byte vectors (one for bf16/fp16, two for fp32), so a
//    warp reads and writes 512 contiguous bytes per instruction.
//  - The thread loads its weight (and mask) elements into registers *before* the rank loop, so those loads are in
//    flight while it computes the low-rank delta, and in-place merges (out == weight) are safe: every element is
//    read before it is written, by the thread that writes it.
//  - The strip's lora_A columns are staged in shared memory once per block (for r <= 64) and reused for every row
//    tile the block walks; lora_B rows are staged per tile. Both are read in their own dtype and converted to the
//    accumulation type as they are staged (no separate conversion kernels). Staged A is permuted so that a warp's
//    16-byte shared loads are contiguous (conflict-free); staged B is transposed so a thread's 4 rows are one
//    16-byte broadcast.
//  - The epilogue (kernels/masked_merge.h, shared with the CPU kernel) writes 16-byte vectors with streaming
//    (evict-first) stores.
// Shapes whose rows are not whole 16-byte vectors, or misaligned pointers, take the same kernel with scalar
// accesses (kVector = false). kHasMask = false compiles the mask away (M = weight != 0, what LoRS uses): without
// its 8 registers the 16-byte kernels fit in 128 registers, two blocks per SM, with no spills.

#include "cuda/device.cuh"
#include "kernels/masked_merge.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>

namespace sparse_adapt::merge_cuda {

constexpr int kThreadsX = 32;  // along the columns: a warp spans a tile row
constexpr int kThreadsY = 8;
constexpr int kThreads = kThreadsX * kThreadsY;
constexpr int kRowsPerThread = 4;
constexpr int kColsPerThread = 8;
constexpr int kTileRows = kThreadsY * kRowsPerThread;  // 32
constexpr int kTileCols = kThreadsX * kColsPerThread;  // 256
constexpr int kBStride = kTileRows + 4;                // staged B row length: a multiple of 4 for 16-byte reads
constexpr int64_t kMaxRankChunk = 64;                  // ranks staged at once (32 for float64)

// The dtype of lora_A / lora_B, read as they are staged.
enum class FactorType : int { kFloat = 0, kDouble = 1, kHalf = 2, kBFloat16 = 3 };

template <typename acc_t>
SA_DEVICE acc_t load_factor(const void* base, FactorType type, int64_t i) {
  switch (type) {
    case FactorType::kFloat:
      return static_cast<acc_t>(static_cast<const float*>(base)[i]);
    case FactorType::kDouble:
      return static_cast<acc_t>(static_cast<const double*>(base)[i]);
    case FactorType::kHalf:
      return static_cast<acc_t>(static_cast<float>(static_cast<const c10::Half*>(base)[i]));
    default:
      return static_cast<acc_t>(static_cast<float>(static_cast<const c10::BFloat16*>(base)[i]));
  }
}

template <typename w_t, typename out_t, typename acc_t>
struct MergeParams {
  const w_t* weight;   // (rows, cols); may alias out
  const void* lora_A;  // (r, cols), a_type
  const void* lora_B;  // (rows, r), b_type
  const bool* mask;    // (rows, cols), or nullptr: M = weight != 0
  out_t* out;          // (rows, cols)
  acc_t scale;
  int64_t rows, cols, r;
  int64_t rank_chunk;  // ranks staged at once: min(r, kMaxRankChunk)
  FactorType a_type, b_type;
};

// A thread's 8 contiguous elements of one row, aligned as one or more 16-byte vectors (8 bytes for the mask).
template <typename T>
struct alignas(sizeof(T) * kColsPerThread >= 16 ? 16 : sizeof(T) * kColsPerThread) Chunk {
  T v[kColsPerThread];
};

template <typename T>
union ChunkBits {
  Chunk<T> chunk;
  int4 vec[sizeof(Chunk<T>) / 16];
};

// The launch shape, a function of the problem alone (plus how many blocks the device runs at once), so that the
// CUDA launcher and the CPU emulation in the C++ tests launch exactly the same grid.
struct MergePlan {
  int64_t col_strips, row_tiles, rank_chunk;
  int64_t grid_y;  // row groups: block (x, y) walks row tiles y, y + grid_y, ...
  size_t smem_bytes;
  bool vector;  // the 16-byte path
};

inline int64_t max_rank_chunk(size_t acc_size) {
  return acc_size == sizeof(double) ? kMaxRankChunk / 2 : kMaxRankChunk;
}

inline MergePlan plan_merge(
    int64_t rows, int64_t cols, int64_t r, size_t acc_size, bool aligned, int64_t resident_blocks) {
  MergePlan p;
  p.col_strips = (cols + kTileCols - 1) / kTileCols;
  p.row_tiles = (rows + kTileRows - 1) / kTileRows;
  p.rank_chunk = std::min(r, max_rank_chunk(acc_size));
  p.smem_bytes = static_cast<size_t>(p.rank_chunk) * (kTileCols + kBStride) * acc_size;
  // One wave: as many blocks as the device holds at once, each walking several row tiles (and so reusing its
  // staged lora_A) -- but never fewer than one row group per strip.
  p.grid_y = std::clamp<int64_t>(resident_blocks / p.col_strips, 1, std::min<int64_t>(p.row_tiles, 65535));
  p.vector = aligned && cols % kColsPerThread == 0;
  return p;
}

template <typename T, int N>
SA_DEVICE void load_shared(const T* p, T (&dst)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) {
    dst[i] = p[i];
  }
}

// Four floats with one 16-byte shared load (the pointer is 16-byte aligned by construction).
template <int N>
SA_DEVICE void load_shared(const float* p, float (&dst)[N]) {
  static_assert(N % 4 == 0, "whole float4s");
#pragma unroll
  for (int q = 0; q < N / 4; ++q) {
    const float4 v = reinterpret_cast<const float4*>(p)[q];
    dst[4 * q] = v.x;
    dst[4 * q + 1] = v.y;
    dst[4 * q + 2] = v.z;
    dst[4 * q + 3] = v.w;
  }
}

template <typename w_t, typename out_t, typename acc_t, bool kVector, bool kHasMask>
__global__ void __launch_bounds__(kThreads, 2) masked_merge_kernel(const MergeParams<w_t, out_t, acc_t> p) {
  const bool has_mask = kHasMask && p.mask != nullptr;
  SA_DYNAMIC_SHARED(unsigned char, smem);
  acc_t* a_s = reinterpret_cast<acc_t*>(smem);  // [rank_chunk][kTileCols], columns permuted (see stage A)
  acc_t* b_s = a_s + p.rank_chunk * kTileCols;  // [rank_chunk][kBStride], transposed lora_B rows

  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * kThreadsX + tx;
  const int64_t col0 = static_cast<int64_t>(blockIdx.x) * kTileCols;
  const int64_t col = col0 + tx * kColsPerThread;  // this thread's first column
  const int64_t row_tiles = (p.rows + kTileRows - 1) / kTileRows;
  const bool a_resident = p.r <= p.rank_chunk;  // all of the strip's lora_A fits: stage it once per block
  bool a_staged = false;

  for (int64_t tile = blockIdx.y; tile < row_tiles; tile += gridDim.y) {
    const int64_t tile_row0 = tile * kTileRows;
    const int64_t row0 = tile_row0 + ty * kRowsPerThread;  // this thread's first row

    // 1. The thread's weight and mask elements, in flight while the rank loop runs (kept packed: 16 registers of
    //    bf16 weights, 8 of mask bytes). Rows and columns past the edge read a clamped, valid address instead of
    //    being skipped: unconditional loads keep the registers free of merges with stale values (which spilled).
    Chunk<w_t> w[kRowsPerThread];
    Chunk<bool> m[kRowsPerThread] = {};
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      const int64_t row = row0 + i < p.rows ? row0 + i : p.rows - 1;
      if constexpr (kVector) {
        const int64_t at = row * p.cols + (col < p.cols ? col : p.cols - kColsPerThread);
        w[i] = *reinterpret_cast<const Chunk<w_t>*>(p.weight + at);
        if (has_mask) {
          m[i] = *reinterpret_cast<const Chunk<bool>*>(p.mask + at);
        }
      } else {
#pragma unroll
        for (int j = 0; j < kColsPerThread; ++j) {
          const int64_t at = row * p.cols + (col + j < p.cols ? col + j : p.cols - 1);
          w[i].v[j] = p.weight[at];
          if (has_mask) {
            m[i].v[j] = p.mask[at];
          }
        }
      }
    }

    // 2. The tile's low-rank delta, rank_chunk ranks at a time through shared memory.
    acc_t acc[kRowsPerThread][kColsPerThread];
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
#pragma unroll
      for (int j = 0; j < kColsPerThread; ++j) {
        acc[i][j] = acc_t(0);
      }
    }
    for (int64_t k0 = 0; k0 < p.r; k0 += p.rank_chunk) {
      const int kn = static_cast<int>(p.r - k0 < p.rank_chunk ? p.r - k0 : p.rank_chunk);
      __syncthreads();  // every thread is done reading the previous chunk (or tile)
      if (!a_resident || !a_staged) {
        // Tile column c belongs to thread c / 8, as its element c % 8; it is stored at
        // (c % 8 / 4) * 128 + (c / 8) * 4 + c % 4, so each half of a thread's 8 columns is one float4 and a
        // warp's float4 reads cover 512 contiguous bytes.
        for (int e = tid; e < kn * kTileCols; e += kThreads) {
          const int k = e / kTileCols, c = e % kTileCols;
          const int64_t gc = col0 + c;
          a_s[k * kTileCols + ((c >> 2) & 1) * (kTileCols / 2) + (c >> 3) * 4 + (c & 3)] =
              gc < p.cols ? load_factor<acc_t>(p.lora_A, p.a_type, (k0 + k) * p.cols + gc) : acc_t(0);
        }
      }
      for (int e = tid; e < kTileRows * kn; e += kThreads) {
        const int i = e / kn, k = e % kn;
        const int64_t row = tile_row0 + i;
        b_s[k * kBStride + i] = row < p.rows ? load_factor<acc_t>(p.lora_B, p.b_type, row * p.r + k0 + k) : acc_t(0);
      }
      __syncthreads();
#pragma unroll 4
      for (int k = 0; k < kn; ++k) {
        acc_t a_lo[kColsPerThread / 2], a_hi[kColsPerThread / 2], a[kColsPerThread], b[kRowsPerThread];
        load_shared(a_s + k * kTileCols + tx * 4, a_lo);
        load_shared(a_s + k * kTileCols + kTileCols / 2 + tx * 4, a_hi);
#pragma unroll
        for (int j = 0; j < kColsPerThread / 2; ++j) {
          a[j] = a_lo[j];
          a[kColsPerThread / 2 + j] = a_hi[j];
        }
        load_shared(b_s + k * kBStride + ty * kRowsPerThread, b);  // one address per warp: a broadcast
        kernels::rank1_update(acc, b, a);
      }
    }
    a_staged = true;

    // 3. Epilogue: merge, round once to the output dtype, store.
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      const int64_t row = row0 + i;
      if (row >= p.rows) {
        continue;
      }
      if constexpr (kVector) {
        if (col >= p.cols) {
          continue;
        }
        ChunkBits<out_t> o;
#pragma unroll
        for (int j = 0; j < kColsPerThread; ++j) {
          const bool keep = has_mask ? m[i].v[j] : kernels::weight_keeps<acc_t>(w[i].v[j]);
          o.chunk.v[j] = kernels::merged_value<out_t>(w[i].v[j], acc[i][j], p.scale, keep);
        }
        char* dst = reinterpret_cast<char*>(p.out + row * p.cols + col);
#pragma unroll
        for (int q = 0; q < static_cast<int>(sizeof(o.vec) / 16); ++q) {
          device::store16_stream(dst + 16 * q, o.vec[q]);
        }
      } else {
#pragma unroll
        for (int j = 0; j < kColsPerThread; ++j) {
          if (col + j < p.cols) {
            const bool keep = has_mask ? m[i].v[j] : kernels::weight_keeps<acc_t>(w[i].v[j]);
            p.out[row * p.cols + col + j] = kernels::merged_value<out_t>(w[i].v[j], acc[i][j], p.scale, keep);
          }
        }
      }
    }
  }
}

}  // namespace sparse_adapt::merge_cuda
