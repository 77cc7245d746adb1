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

// A key that orders entries by score (larger first), then by index (lower first): the high 32 bits map the
// float monotonically to an unsigned integer (NaN lowest, -0 == +0), the low 32 bits are the inverted index.
// Keys of one slice are therefore unique, and "the k largest keys" is a well-defined set.
SA_HOST_DEVICE uint64_t topk_key(float score, int64_t index) {
  uint32_t ordered = 0;  // NaN ranks below every number
  if (score == score) {
    const uint32_t bits = score == 0.0f ? 0u : float_bits(score);
    ordered = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  }
  return (static_cast<uint64_t>(ordered) << 32) | (0xFFFFFFFFu - static_cast<uint32_t>(index));
}

}  // namespace sparse_adapt::kernels
