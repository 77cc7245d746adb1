// CPU kernel of ema_topk_ / ema_topk_multi_, and the CPU registrations. The slices of every matrix run in
// parallel. Per slice: the EMA update (kernels/ema_topk.h, as on the GPU), then the k-th largest ordered score by
// radix select -- 8 bits a pass from the top, each pass over the candidates the previous one left -- and a last
// pass that keeps the entries above it plus, among the entries equal to it, the lowest indices: the same set as
// the GPU's 64-bit keys (score, then inverted index) select.

#include "kernels/ema_topk.h"
#include "ops.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <vector>

namespace sparse_adapt {
namespace {

// The EMA loop is where the CPU path spends its time: compiled for AVX2 + FMA (where fmaf is one instruction) and
// the baseline, picked at load time.
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define SA_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define SA_CPU_CLONES
#endif

// The entries to keep, as "ordered score > above, or == above among the first `ties` of them in index order".
struct Threshold {
  uint32_t above;
  int64_t ties;  // -1: every entry equal to `above` is kept too
};

// The k largest (0 < k < n) of keys[0..n): radix select over candidates compacted into `buf`. The digits start
// at the highest bit in which the keys differ (scores of one slice share their sign and the top of their exponent),
// so the first pass already spreads them and two or three passes usually finish.
Threshold select_top(const uint32_t* keys, int64_t n, int64_t k, std::vector<uint32_t>& buf) {
  uint32_t lo = keys[0], hi = keys[0];
  for (int64_t i = 1; i < n; ++i) {
    lo = std::min(lo, keys[i]);
    hi = std::max(hi, keys[i]);
  }
  if (lo == hi) {
    return {hi, k};  // all equal: the first k in index order
  }
  const int top = 31 - __builtin_clz(lo ^ hi);                 // highest differing bit
  uint32_t prefix = top == 31 ? 0u : lo & ~((2u << top) - 1);  // the bits all keys share
  const uint32_t* cand = keys;
  int64_t m = n, remaining = k;
  for (int shift = std::max(top - 7, 0);; shift = std::max(shift - 8, 0)) {
    // Four interleaved histograms: neighbouring keys often share a bin, and one histogram would make every
    // increment wait for the previous one. (A digit that reaches below the previous pass's re-reads bits all
    // candidates share, which is harmless.)
    std::array<std::array<uint32_t, 256>, 4> parts{};
    int64_t i = 0;
    for (; i + 4 <= m; i += 4) {
      ++parts[0][(cand[i] >> shift) & 0xFF];
      ++parts[1][(cand[i + 1] >> shift) & 0xFF];
      ++parts[2][(cand[i + 2] >> shift) & 0xFF];
      ++parts[3][(cand[i + 3] >> shift) & 0xFF];
    }
    for (; i < m; ++i) {
      ++parts[0][(cand[i] >> shift) & 0xFF];
    }
    const auto hist = [&](int d) -> int64_t { return parts[0][d] + parts[1][d] + parts[2][d] + parts[3][d]; };
    int d = 255;
    int64_t above = 0;
    while (above + hist(d) < remaining) {
      above += hist(d--);
    }
    remaining -= above;
    prefix |= static_cast<uint32_t>(d) << shift;
    if (hist(d) == remaining) {
      // The whole bin is kept: every key whose digits so far are >= prefix's (lower bits 0) -- no ties to break.
      return {prefix == 0 ? 0u : prefix - 1, prefix == 0 ? -1 : 0};
    }
    if (shift == 0) {
      break;  // prefix is now the k-th largest key itself; `remaining` of the keys equal to it are kept
    }
    int64_t w = 0;
    for (int64_t j = 0; j < m; ++j) {  // branch-free compaction of the chosen bin
      buf[w] = cand[j];
      w += static_cast<int>((cand[j] >> shift) & 0xFF) == d;
    }
    cand = buf.data();
    m = w;
  }
  return {prefix, remaining};
}

// The EMA update of slices [s0, s1) of a matrix, in memory order (so the loop vectorizes), and their ordered
// scores into keys, slice by slice: keys[(s - s0) * n + i] for entry i of slice s.
template <typename scalar_t>
SA_CPU_CLONES void ema_update(const TopkMatrix& m, int64_t s0, int64_t s1, float beta, uint32_t* keys) {
  using acc_t = at::opmath_type<scalar_t>;
  scalar_t* param = m.param.mutable_data_ptr<scalar_t>();
  const scalar_t* grad = m.grad.const_data_ptr<scalar_t>();
  float* score = m.score.mutable_data_ptr<float>();
  const SliceLayout& l = m.layout;
  const int64_t n = l.n;
  if (l.elem_stride == 1) {  // slices are rows: one contiguous run
    const int64_t begin = s0 * l.slice_stride, count = (s1 - s0) * n;
    for (int64_t i = 0; i < count; ++i) {
      const float sc = kernels::ema_score<acc_t>(score[begin + i], param[begin + i], grad[begin + i], beta);
      score[begin + i] = sc;
      keys[i] = kernels::ordered_score(sc);
    }
    return;
  }
  for (int64_t i = 0; i < n; ++i) {  // slices are columns: walk the rows, the slices' entries side by side
    const int64_t row = i * l.elem_stride;
    for (int64_t s = s0; s < s1; ++s) {
      const float sc = kernels::ema_score<acc_t>(score[row + s], param[row + s], grad[row + s], beta);
      score[row + s] = sc;
      keys[(s - s0) * n + i] = kernels::ordered_score(sc);
    }
  }
}

// Zero the entries of one slice that are not among its k largest (keys: the slice's ordered scores).
template <typename scalar_t>
void prune_slice(
    scalar_t* param, const SliceLayout& l, int64_t slice, int64_t k, const uint32_t* keys, std::vector<uint32_t>& buf) {
  const int64_t n = l.n, base = slice * l.slice_stride;
  if (k == n) {
    return;
  }
  if (k == 0) {
    for (int64_t i = 0; i < n; ++i) {
      param[base + i * l.elem_stride] = scalar_t(0);
    }
    return;
  }
  const Threshold t = select_top(keys, n, k, buf);
  const bool all_ties = t.ties < 0;
  int64_t ties = t.ties;
  for (int64_t i = 0; i < n; ++i) {
    // Ties at the threshold are rare: keep the common path a comparison.
    const bool keep = keys[i] > t.above || (keys[i] == t.above && (all_ties || ties-- > 0));
    scalar_t& p = param[base + i * l.elem_stride];
    p = keep ? p : scalar_t(0);
  }
}

// Work items of about kChunkEntries entries: whole matrices when they are small (RoseLoRA's hundreds of
// adapters), ranges of slices of a large one.
constexpr int64_t kChunkEntries = 16384;

struct Chunk {
  size_t matrix;
  int64_t s0, s1;
};

void ema_topk_launch_cpu(const std::vector<TopkMatrix>& matrices, double beta) {
  std::vector<Chunk> chunks;
  int64_t largest = 1;
  for (size_t i = 0; i < matrices.size(); ++i) {
    const SliceLayout& l = matrices[i].layout;
    const int64_t per_chunk = std::max<int64_t>(1, kChunkEntries / l.n);
    for (int64_t s = 0; s < l.slices; s += per_chunk) {
      chunks.push_back({i, s, std::min(l.slices, s + per_chunk)});
      largest = std::max(largest, (chunks.back().s1 - s) * l.n);
    }
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, matrices.front().param.scalar_type(), "ema_topk_cpu", [&] {
    at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
      std::vector<uint32_t> keys(static_cast<size_t>(largest)), buf(static_cast<size_t>(largest));
      for (int64_t c = begin; c < end; ++c) {
        const Chunk& chunk = chunks[c];
        const TopkMatrix& m = matrices[chunk.matrix];
        ema_update<scalar_t>(m, chunk.s0, chunk.s1, static_cast<float>(beta), keys.data());
        for (int64_t s = chunk.s0; s < chunk.s1; ++s) {
          prune_slice<scalar_t>(
              m.param.mutable_data_ptr<scalar_t>(), m.layout, s, m.k, keys.data() + (s - chunk.s0) * m.layout.n, buf);
        }
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(sparse_adapt, CPU, m) {
  bind_ema_topk<ema_topk_launch_cpu>(m);
}

}  // namespace sparse_adapt
