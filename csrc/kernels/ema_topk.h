#pragma once
// Per-element arithmetic of ema_topk_, shared by the CPU kernel (cpu/ema_topk.cpp) and the CUDA kernel
// (cuda/ema_topk.cu). Both must pick the same entries, bit for bit, so the score update uses an explicit fma
// (correctly rounded on both, never left to the compiler's contraction choices) and the ranking uses one
// integer key with a strict total order.

#include "kernels/macros.h"

#include <cmath>
#include <cstdint>
#include <cstring>

namespace sparse_adapt::kernels {

// score ← β·score + (1−β)·|p·g|, in float32; p·g in the accumulation type (double for float64 params).
template <typename acc_t>
SA_HOST_DEVICE float ema_score(float score, acc_t p, acc_t g, float beta) {
  const acc_t pg = p * g;
  const float sensitivity = static_cast<float>(pg < acc_t(0) ? -pg : pg);
  return fmaf(beta, score, (1.0f - beta) * sensitivity);
}

SA_HOST_DEVICE uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

// The score as an unsigned integer of the same order: larger scores map to larger integers, NaN to 0 (below every
// number), -0 and +0 to the same value.
SA_HOST_DEVICE uint32_t ordered_score(float score) {
  if (score != score) {
    return 0u;
  }
  const uint32_t bits = score == 0.0f ? 0u : float_bits(score);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// A key that orders entries by score (larger first), then by index (lower first): the high 32 bits are the
// ordered score, the low 32 bits the inverted index. Keys of one slice are therefore unique, and "the k largest
// keys" is a well-defined set. (The CPU kernel selects on the ordered score and breaks ties by index order, which
// is the same set.)
SA_HOST_DEVICE uint64_t topk_key(float score, int64_t index) {
  return (static_cast<uint64_t>(ordered_score(score)) << 32) | (0xFFFFFFFFu - static_cast<uint32_t>(index));
}

}  // namespace sparse_adapt::kernels
