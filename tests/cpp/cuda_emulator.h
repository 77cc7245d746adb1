#pragma once
// Runs the CUDA kernels of csrc/cuda/*_kernel.cuh on the CPU, so that their indexing, tails, vector paths and
// barriers are tested where there is no GPU (CI). Include this before a kernel header and launch with
// sa_emu::launch(grid, block, shared_bytes, kernel, args...).
//
// Each CUDA thread of a block is a std::thread; __syncthreads and __syncwarp are real barriers (a thread that
// returns leaves them, as on the GPU), shuffles exchange through a per-warp slot array, atomics are std::atomic_ref,
// `__shared__` variables are shared by the block's threads. Blocks run one after another. A barrier that not every
// live thread of its block (or warp) reaches -- a divergent __syncthreads -- aborts with a message instead of
// hanging. What this cannot show: timing, the memory model of a real GPU (emulated threads synchronize more than
// warps do), and bank conflicts.

#define SA_CUDA_EMULATION 1

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

struct alignas(16) int4 {
  int x, y, z, w;
};
struct alignas(16) float4 {
  float x, y, z, w;
};

namespace sa_emu {

// A reusable barrier that threads may leave (arrive_and_drop), and that aborts instead of deadlocking.
class Barrier {
 public:
  explicit Barrier(int expected) : expected_(expected) {}

  void arrive_and_wait() {
    std::unique_lock<std::mutex> lock(mu_);
    const long gen = generation_;
    if (++arrived_ == expected_) {
      release();
      return;
    }
    if (!cv_.wait_for(lock, std::chrono::seconds(60), [&] { return generation_ != gen; })) {
      std::fprintf(
          stderr,
          "cuda_emulator: a barrier waited 60 s for %d of %d threads: a __syncthreads or "
          "__syncwarp that not every live thread reaches\n",
          expected_ - arrived_, expected_);
      std::abort();
    }
  }

  void arrive_and_drop() {
    std::unique_lock<std::mutex> lock(mu_);
    --expected_;
    if (expected_ > 0 && arrived_ == expected_) {
      release();
    }
  }

 private:
  void release() {
    arrived_ = 0;
    ++generation_;
    cv_.notify_all();
  }

  std::mutex mu_;
  std::condition_variable cv_;
  int expected_;
  int arrived_ = 0;
  long generation_ = 0;
};

struct Block {
  std::unique_ptr<Barrier> block_barrier;
  std::vector<std::unique_ptr<Barrier>> warp_barriers;
  std::vector<uint64_t> shuffle;       // one slot per thread
  std::vector<unsigned char> dynamic;  // dynamic shared memory

  Block(int threads, size_t shared_bytes)
      : block_barrier(std::make_unique<Barrier>(threads)),
        shuffle(threads, 0),
        dynamic(shared_bytes + 16, 0xA5) {  // poisoned: a kernel must not read what it did not write
    for (int w = 0; w < (threads + 31) / 32; ++w) {
      warp_barriers.push_back(std::make_unique<Barrier>(std::min(32, threads - 32 * w)));
    }
  }
};

struct ThreadState {
  dim3 thread_idx, block_idx, block_dim, grid_dim;
  Block* block = nullptr;
  int linear = 0;  // thread number within the block
};

inline thread_local ThreadState current;

inline void* dynamic_shared() {
  return current.block->dynamic.data();
}

// The grid's blocks run one after another on one pool of blockDim threads: between two blocks every thread waits
// at `between` while thread 0 sets up the next block's barriers and shared memory.
template <typename Kernel, typename... Args>
void launch(dim3 grid, dim3 block_dim, size_t shared_bytes, Kernel kernel, const Args&... args) {
  const int threads = static_cast<int>(block_dim.x * block_dim.y * block_dim.z);
  const long blocks = static_cast<long>(grid.x) * grid.y * grid.z;
  std::unique_ptr<Block> block = std::make_unique<Block>(threads, shared_bytes);
  Barrier between(threads);
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      for (long b = 0; b < blocks; ++b) {
        current.block = block.get();
        current.linear = t;
        current.thread_idx = dim3(t % block_dim.x, (t / block_dim.x) % block_dim.y, t / (block_dim.x * block_dim.y));
        current.block_idx = dim3(b % grid.x, (b / grid.x) % grid.y, b / (static_cast<long>(grid.x) * grid.y));
        current.block_dim = block_dim;
        current.grid_dim = grid;
        kernel(args...);
        block->warp_barriers[t / 32]->arrive_and_drop();
        block->block_barrier->arrive_and_drop();
        between.arrive_and_wait();
        if (t == 0) {
          block = std::make_unique<Block>(threads, shared_bytes);
        }
        between.arrive_and_wait();
      }
    });
  }
  for (auto& th : pool) {
    th.join();
  }
}

}  // namespace sa_emu

// ---- the CUDA names the kernels use --------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define threadIdx (sa_emu::current.thread_idx)
#define blockIdx (sa_emu::current.block_idx)
#define blockDim (sa_emu::current.block_dim)
#define gridDim (sa_emu::current.grid_dim)

inline void __syncthreads() {
  sa_emu::current.block->block_barrier->arrive_and_wait();
}

inline void __syncwarp(unsigned = 0xffffffffu) {
  sa_emu::current.block->warp_barriers[sa_emu::current.linear / 32]->arrive_and_wait();
}

inline unsigned atomicAdd(unsigned* address, unsigned value) {
  return std::atomic_ref<unsigned>(*address).fetch_add(value);
}

#define SA_DEVICE inline
#define SA_DYNAMIC_SHARED(type, name) type* name = static_cast<type*>(sa_emu::dynamic_shared())

namespace sparse_adapt::device {

inline void store16_stream(void* p, int4 v) {
  std::memcpy(p, &v, 16);
}

inline unsigned shfl_down(unsigned v, unsigned delta) {
  auto& block = *sa_emu::current.block;
  const int t = sa_emu::current.linear, lane = t % 32;
  block.shuffle[t] = v;
  __syncwarp();
  const unsigned out = lane + static_cast<int>(delta) < 32 ? static_cast<unsigned>(block.shuffle[t + delta]) : v;
  __syncwarp();
  return out;
}

}  // namespace sparse_adapt::device
