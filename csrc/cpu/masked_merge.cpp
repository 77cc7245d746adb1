// CPU kernel of the masked merge, and the CPU registrations of masked_merge / masked_merge_.

#include "kernels/masked_merge.h"
#include "ops.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

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

// 32-byte vectors of the accumulation type (GCC/Clang vector extensions): one AVX2 register (half an AVX-512 one).
constexpr int64_t kVecBytes = 32;
template <typename acc_t>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(kVecBytes)));
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(kVecBytes)));
};

// The low-rank delta is computed in tiles of kRowBlock rows x kVecs vectors, whose accumulators stay in
// registers while k runs over the rank: each lora_A vector loaded serves kRowBlock rows. 6 x 2 accumulators, 2
// lora_A vectors and a broadcast lora_B value take 15 of AVX2's 16 vector registers: nothing spills.
constexpr int kRowBlock = 6;
constexpr int kVecs = 2;

template <typename acc_t>
constexpr int64_t tile_cols() {
  return kVecs * kVecBytes / static_cast<int64_t>(sizeof(acc_t));
}

// tile (kRowBlock, tile_cols) = lora_B[row0:row0+4] (.., r) @ lora_A[:, c0:c0+tile_cols] (r, ..): a full tile.
template <typename acc_t>
__attribute__((always_inline)) inline void lowrank_tile(
    const acc_t* lora_A, const acc_t* lora_B, int64_t in, int64_t r, int64_t row0, int64_t c0, acc_t* tile) {
  using V = typename Vec<acc_t>::type;
  constexpr int64_t lanes = kVecBytes / sizeof(acc_t);
  V acc[kRowBlock][kVecs] = {};
  for (int64_t k = 0; k < r; ++k) {
    V a[kVecs];
    acc_t b[kRowBlock];
    for (int64_t v = 0; v < kVecs; ++v) {
      std::memcpy(&a[v], lora_A + k * in + c0 + v * lanes, sizeof(V));
    }
    for (int64_t i = 0; i < kRowBlock; ++i) {
      b[i] = lora_B[(row0 + i) * r + k];
    }
    kernels::rank1_update(acc, b, a);
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

// kHasMask is a template argument so that, without a mask, the epilogue compiles to a branch-free, vectorized
// select.
template <typename w_t, typename out_t, bool kHasMask>
SA_CPU_CLONES void masked_merge_rows(
    const w_t* weight,                     // (out, in)
    const at::opmath_type<out_t>* lora_A,  // (r, in)
    const at::opmath_type<out_t>* lora_B,  // (out, r)
    const bool* mask,                      // (out, in); ignored unless kHasMask (then M = weight != 0)
    at::opmath_type<out_t> scale,
    out_t* out,  // (out, in), may alias weight (then w_t == out_t)
    int64_t in, int64_t r, int64_t row_begin, int64_t row_end) {
  using acc_t = at::opmath_type<out_t>;
  constexpr int64_t width = tile_cols<acc_t>();
  alignas(64) acc_t tile[kRowBlock * width];
  for (int64_t row0 = row_begin; row0 < row_end; row0 += kRowBlock) {
    const int64_t rows = std::min<int64_t>(kRowBlock, row_end - row0);
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
          const w_t w = weight[base + j];
          const bool keep = kHasMask ? mask[base + j] : kernels::weight_keeps<acc_t>(w);
          out[base + j] = kernels::merged_value<out_t>(w, t[j], scale, keep);
        }
      }
    }
  }
}

template <typename w_t, typename out_t>
void launch_typed(
    const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale, const at::Tensor& mask,
    const at::Tensor& out) {
  using acc_t = at::opmath_type<out_t>;
  // O(r * (in + out)) conversions of the factors, never O(out * in); no copy when they already are acc_t.
  const at::Tensor a = lora_A.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  const at::Tensor b = lora_B.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  const int64_t rows = weight.size(0), in = weight.size(1), r = a.size(0);
  const bool* m = mask.defined() ? mask.const_data_ptr<bool>() : nullptr;
  const w_t* w = weight.const_data_ptr<w_t>();
  const acc_t* ap = a.const_data_ptr<acc_t>();
  const acc_t* bp = b.const_data_ptr<acc_t>();
  out_t* o = out.mutable_data_ptr<out_t>();
  const auto s = static_cast<acc_t>(scale);
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrainElements / in), [&](int64_t begin, int64_t end) {
    if (m != nullptr) {
      masked_merge_rows<w_t, out_t, true>(w, ap, bp, m, s, o, in, r, begin, end);
    } else {
      masked_merge_rows<w_t, out_t, false>(w, ap, bp, nullptr, s, o, in, r, begin, end);
    }
  });
}

void masked_merge_launch_cpu(
    const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale, const at::Tensor& mask,
    const at::Tensor& out) {
  if (weight.scalar_type() == at::kFloat && out.scalar_type() != at::kFloat) {
    AT_DISPATCH_REDUCED_FLOATING_TYPES(out.scalar_type(), "masked_merge_cpu", [&] {
      launch_typed<float, scalar_t>(weight, lora_A, lora_B, scale, mask, out);
    });
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "masked_merge_cpu", [&] {
    launch_typed<scalar_t, scalar_t>(weight, lora_A, lora_B, scale, mask, out);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(sparse_adapt, CPU, m) {
  bind_masked_merge<masked_merge_launch_cpu>(m);
}

}  // namespace sparse_adapt
