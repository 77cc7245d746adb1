// CPU kernel of the masked merge.

#include "kernels/masked_merge.h"
#include "ops.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>

namespace sparse_adapt {
namespace {

// Elements per parallel task, as ATen's own elementwise kernels use (at::internal::GRAIN_SIZE).
constexpr int64_t kGrainElements = 32768;

// Compiled for AVX-512, AVX2 and the baseline, picked at load time: the extension is built without -march,
// and this loop is where the CPU path spends its time.
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define SA_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SA_CPU_CLONES
#endif

// 64-byte vectors of the accumulation type (GCC/Clang vector extensions): one AVX-512 register, two AVX2 ones.
template <typename acc_t>
struct Vec64;
template <>
struct Vec64<float> {
  typedef float type __attribute__((vector_size(64)));
};
template <>
struct Vec64<double> {
  typedef double type __attribute__((vector_size(64)));
};

// The low-rank delta is computed in tiles of kRowBlock rows x kVecs vectors, whose accumulators stay in
// registers (16 of them) while k runs over the rank: each lora_A vector loaded serves kRowBlock rows.
constexpr int64_t kRowBlock = 4;
constexpr int64_t kVecs = 4;

template <typename acc_t>
constexpr int64_t tile_cols() {
  return kVecs * 64 / static_cast<int64_t>(sizeof(acc_t));
}

// tile (kRowBlock, tile_cols) = lora_B[row0:row0+4] (.., r) @ lora_A[:, c0:c0+tile_cols] (r, ..): a full tile.
template <typename acc_t>
__attribute__((always_inline)) inline void lowrank_tile(
    const acc_t* lora_A, const acc_t* lora_B, int64_t in, int64_t r, int64_t row0, int64_t c0, acc_t* tile) {
  using V = typename Vec64<acc_t>::type;
  constexpr int64_t lanes = 64 / sizeof(acc_t);
  V acc[kRowBlock][kVecs] = {};
  for (int64_t k = 0; k < r; ++k) {
    V a[kVecs];
    for (int64_t v = 0; v < kVecs; ++v) {
      std::memcpy(&a[v], lora_A + k * in + c0 + v * lanes, sizeof(V));
    }
    for (int64_t i = 0; i < kRowBlock; ++i) {
      const acc_t b = lora_B[(row0 + i) * r + k];
      for (int64_t v = 0; v < kVecs; ++v) {
        acc[i][v] += b * a[v];
      }
    }
  }
  std::memcpy(tile, acc, sizeof(acc));
}

// The same for a partial tile at the right or bottom edge (rows x cols of it).
template <typename acc_t>
inline void lowrank_tile_edge(
    const acc_t* lora_A, const acc_t* lora_B, int64_t in, int64_t r, int64_t row0, int64_t c0, int64_t rows,
    int64_t cols, acc_t* tile) {
  constexpr int64_t width = tile_cols<acc_t>();
  for (int64_t i = 0; i < rows; ++i) {
    acc_t* t = tile + i * width;
    std::fill(t, t + cols, acc_t(0));
    for (int64_t k = 0; k < r; ++k) {
      const acc_t b = lora_B[(row0 + i) * r + k];
      const acc_t* a = lora_A + k * in + c0;
      for (int64_t j = 0; j < cols; ++j) {
        t[j] += b * a[j];
      }
    }
  }
}

// kHasMask is a template argument so that, without a mask, the null mask pointer is a constant and the
// epilogue compiles to a branch-free, vectorized select.
template <typename scalar_t, bool kHasMask>
SA_CPU_CLONES void masked_merge_rows(
    const scalar_t* weight,                    // (out, in)
    const at::opmath_type<scalar_t>* lora_A,  // (r, in)
    const at::opmath_type<scalar_t>* lora_B,  // (out, r)
    const bool* mask,                          // (out, in); ignored unless kHasMask (then M = weight != 0)
    at::opmath_type<scalar_t> scale,
    scalar_t* out,  // (out, in), may alias weight
    int64_t in, int64_t r, int64_t row_begin, int64_t row_end) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t width = tile_cols<acc_t>();
  const bool* m = kHasMask ? mask : nullptr;
  alignas(64) acc_t tile[kRowBlock * width];
  for (int64_t row0 = row_begin; row0 < row_end; row0 += kRowBlock) {
    const int64_t rows = std::min(kRowBlock, row_end - row0);
    for (int64_t c0 = 0; c0 < in; c0 += width) {
      const int64_t cols = std::min(width, in - c0);
      if (rows == kRowBlock && cols == width) {
        lowrank_tile(lora_A, lora_B, in, r, row0, c0, tile);
      } else {
        lowrank_tile_edge(lora_A, lora_B, in, r, row0, c0, rows, cols, tile);
      }
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t base = (row0 + i) * in + c0;
        const acc_t* t = tile + i * width;
        for (int64_t j = 0; j < cols; ++j) {
          out[base + j] = kernels::merged_value(weight[base + j], t[j], scale, m, base + j);
        }
      }
    }
  }
}

}  // namespace

void masked_merge_launch_cpu(
    const at::Tensor& weight, const at::Tensor& lora_A_acc, const at::Tensor& lora_B_acc, double scale,
    const at::Tensor& mask, const at::Tensor& out) {
  const int64_t rows = weight.size(0), in = weight.size(1), r = lora_A_acc.size(0);
  const bool* mask_ptr = mask.defined() ? mask.const_data_ptr<bool>() : nullptr;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / in);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "masked_merge_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* w = weight.const_data_ptr<scalar_t>();
    const acc_t* a = lora_A_acc.const_data_ptr<acc_t>();
    const acc_t* b = lora_B_acc.const_data_ptr<acc_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const auto s = static_cast<acc_t>(scale);
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      if (mask_ptr != nullptr) {
        masked_merge_rows<scalar_t, true>(w, a, b, mask_ptr, s, o, in, r, begin, end);
      } else {
        masked_merge_rows<scalar_t, false>(w, a, b, nullptr, s, o, in, r, begin, end);
      }
    });
  });
}

}  // namespace sparse_adapt
