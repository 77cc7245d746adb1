#pragma once
// CUDA kernel of ema_topk_ / ema_topk_multi_ (launched by cuda/ema_topk.cu).
//
// A *team* of threads owns one slice (a row of lora_A, a column of lora_B): a warp for short slices, so that a
// 256-thread block works on 8 slices at once; a whole block for long ones. The team updates the slice's EMA scores,
// then finds the k-th largest 64-bit key (kernels/ema_topk.h) by radix select, 8 bits a pass from the top, with a
// 256-bin histogram in shared memory. One warp reads the histogram -- 8 bins a lane, a shuffle suffix-scan across
// lanes -- to pick the bin that completes the top k; the team stops as soon as that bin holds exactly the entries
// still needed (within the 32 score bits for untied scores). A last pass zeroes the entries below the threshold.
//
// Many matrices go to one launch: their descriptors travel in the kernel's argument (up to kMaxMatrices of them),
// and a team finds its matrix by binary search over their first slice numbers. Each thread always visits the same
// entries (i = lane, lane + team size, ...), so the scores it rereads are ones it wrote itself.

#include "cuda/device.cuh"
#include "kernels/ema_topk.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace sparse_adapt::topk_cuda {

constexpr int kBins = 256;
constexpr int kWarp = 32;
constexpr int kBinsPerLane = kBins / kWarp;
constexpr int kWarpTeamBlock = 256;      // threads of a block of warp teams: 8 slices a block
constexpr int kMaxMatrices = 48;         // descriptors in one launch's argument (3.5 KB, under the 4 KB limit)
constexpr int64_t kWarpTeamMaxN = 1024;  // slices up to this long get a warp each; longer ones a block

struct TopkSlices {
  void* param;                                   // (rows, cols) of the launch's scalar type
  const void* grad;                              // like param
  float* score;                                  // (rows, cols)
  int64_t slices, n, slice_stride, elem_stride;  // entry i of slice j: j * slice_stride + i * elem_stride
  int64_t k;                                     // entries kept per slice
  int64_t first_slice;                           // number of the matrix's first slice in the launch
};

struct TopkBatch {
  TopkSlices m[kMaxMatrices];
  int count;
  int64_t slices;  // over all matrices
  float beta;
};

struct TopkLaunch {
  TopkBatch batch;
  bool warp_teams;
  int64_t blocks;
  int threads;
};

// Threads of a block team: 256 when there are slices enough to fill the GPU, else as many as the slices are long
// (a thread per ~16 entries, 128 to 1024), so that a few long slices still use the machine.
inline int block_team_threads(int64_t longest, int64_t slices, int sms) {
  if (slices >= 2 * static_cast<int64_t>(sms)) {
    return 256;
  }
  int threads = 128;
  while (threads < 1024 && threads * 16 < longest) {
    threads *= 2;
  }
  return threads;
}

// The launches for a set of matrices (their first_slice fields are filled in here): short slices to warp teams,
// long ones to block teams, kMaxMatrices descriptors a launch. A function of the problem alone, shared by the
// CUDA launcher and the CPU emulation in the C++ tests.
inline std::vector<TopkLaunch> plan_topk(const std::vector<TopkSlices>& matrices, float beta, int sms) {
  std::vector<TopkLaunch> launches;
  for (const bool warp_teams : {true, false}) {
    std::vector<TopkSlices> group;
    for (const TopkSlices& m : matrices) {
      if ((m.n <= kWarpTeamMaxN) == warp_teams) {
        group.push_back(m);
      }
    }
    for (size_t start = 0; start < group.size(); start += kMaxMatrices) {
      TopkLaunch l{};
      l.warp_teams = warp_teams;
      l.batch.count = static_cast<int>(std::min<size_t>(kMaxMatrices, group.size() - start));
      l.batch.beta = beta;
      int64_t slices = 0, longest = 0;
      for (int i = 0; i < l.batch.count; ++i) {
        l.batch.m[i] = group[start + i];
        l.batch.m[i].first_slice = slices;
        slices += group[start + i].slices;
        longest = std::max(longest, group[start + i].n);
      }
      l.batch.slices = slices;
      const int64_t teams_per_block = warp_teams ? kWarpTeamBlock / kWarp : 1;
      l.blocks = (slices + teams_per_block - 1) / teams_per_block;
      l.threads = warp_teams ? kWarpTeamBlock : block_team_threads(longest, slices, sms);
      launches.push_back(l);
    }
  }
  return launches;
}

// What a team shares: its histogram and the radix-select state.
struct TeamState {
  unsigned hist[kBins];
  uint64_t prefix, prefix_mask;  // the digits chosen so far, and which bits they cover
  int64_t remaining;             // entries still to choose among the keys matching prefix
  int done;
};

template <bool kWarpTeams>
SA_DEVICE void team_sync() {
  if constexpr (kWarpTeams) {
    __syncwarp();
  } else {
    __syncthreads();
  }
}

// One warp (all 32 lanes) picks the bin that completes the top `remaining`: lane l holds bins 8l .. 8l+7, a
// shuffle scan gives each lane the count of the bins at and above its own, and the one lane whose range holds the
// boundary walks its 8 bins down.
SA_DEVICE void choose_bin(TeamState& st, int shift, int lane) {
  unsigned local = 0;
#pragma unroll
  for (int q = 0; q < kBinsPerLane; ++q) {
    local += st.hist[lane * kBinsPerLane + q];
  }
  unsigned at_or_above = local;  // inclusive suffix sum over lanes
#pragma unroll
  for (int d = 1; d < kWarp; d <<= 1) {
    const unsigned other = device::shfl_down(at_or_above, d);
    if (lane + d < kWarp) {
      at_or_above += other;
    }
  }
  const int64_t remaining = st.remaining;
  __syncwarp();                                               // every lane has read st before the chosen lane writes it
  int64_t above = static_cast<int64_t>(at_or_above) - local;  // candidates in the bins above this lane's
  if (above < remaining && remaining <= static_cast<int64_t>(at_or_above)) {
    for (int q = kBinsPerLane - 1; q >= 0; --q) {
      const int d = lane * kBinsPerLane + q;
      const int64_t h = st.hist[d];
      if (above + h >= remaining) {
        st.remaining = remaining - above;
        st.prefix |= static_cast<uint64_t>(d) << shift;
        st.prefix_mask |= uint64_t(0xFF) << shift;
        st.done = h == remaining - above;  // the whole bin is kept: keys >= prefix are exactly the top k
        break;
      }
      above += h;
    }
  }
}

template <typename scalar_t, bool kWarpTeams>
SA_DEVICE void select_slice(const TopkSlices& t, int64_t j, float beta, TeamState& st, int lane, int team_size) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  scalar_t* param = static_cast<scalar_t*>(t.param);
  const scalar_t* grad = static_cast<const scalar_t*>(t.grad);
  const int64_t base = j * t.slice_stride, n = t.n, stride = t.elem_stride, k = t.k;

  for (int64_t i = lane; i < n; i += team_size) {
    const int64_t off = base + i * stride;
    t.score[off] =
        kernels::ema_score<acc_t>(t.score[off], static_cast<acc_t>(param[off]), static_cast<acc_t>(grad[off]), beta);
  }
  if (k == n) {
    return;  // every entry is kept (uniform over the team)
  }
  if (lane == 0) {
    st.prefix = k == 0 ? ~uint64_t(0) : 0;  // k == 0: a threshold above every key
    st.prefix_mask = 0;
    st.remaining = k;
    st.done = k == 0;
  }
  team_sync<kWarpTeams>();
  for (int shift = 56; shift >= 0; shift -= 8) {
    if (st.done) {
      break;
    }
    for (int b = lane; b < kBins; b += team_size) {
      st.hist[b] = 0;
    }
    team_sync<kWarpTeams>();
    const uint64_t want = st.prefix, want_mask = st.prefix_mask;
    for (int64_t i = lane; i < n; i += team_size) {
      const uint64_t key = kernels::topk_key(t.score[base + i * stride], i);
      if ((key & want_mask) == want) {
        atomicAdd(&st.hist[(key >> shift) & 0xFF], 1u);
      }
    }
    team_sync<kWarpTeams>();
    if (lane < kWarp) {
      choose_bin(st, shift, lane);
    }
    team_sync<kWarpTeams>();
  }
  const uint64_t threshold = st.prefix;
  for (int64_t i = lane; i < n; i += team_size) {
    const int64_t off = base + i * stride;
    if (kernels::topk_key(t.score[off], i) < threshold) {
      param[off] = scalar_t(0);
    }
  }
}

// kWarpTeams: blocks of kWarpTeamBlock threads, a warp per slice; else one block (of any multiple of 32 threads)
// per slice.
template <typename scalar_t, bool kWarpTeams>
__global__ void __launch_bounds__(1024) ema_topk_kernel(const TopkBatch batch) {
  __shared__ TeamState states[kWarpTeams ? kWarpTeamBlock / kWarp : 1];
  const int team = kWarpTeams ? static_cast<int>(threadIdx.x) / kWarp : 0;
  const int lane = kWarpTeams ? static_cast<int>(threadIdx.x) % kWarp : static_cast<int>(threadIdx.x);
  const int team_size = kWarpTeams ? kWarp : static_cast<int>(blockDim.x);
  const int64_t slice = kWarpTeams ? static_cast<int64_t>(blockIdx.x) * (kWarpTeamBlock / kWarp) + team
                                   : static_cast<int64_t>(blockIdx.x);
  if (slice >= batch.slices) {
    return;  // a whole team: the last block of warp teams may have spare warps
  }
  int lo = 0, hi = batch.count - 1;  // the matrix whose slices include `slice`
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (batch.m[mid].first_slice <= slice) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  const TopkSlices& t = batch.m[lo];
  select_slice<scalar_t, kWarpTeams>(t, slice - t.first_slice, batch.beta, states[team], lane, team_size);
}

}  // namespace sparse_adapt::topk_cuda
