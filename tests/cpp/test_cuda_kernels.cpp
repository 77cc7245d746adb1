// The CUDA kernels (csrc/cuda/*_kernel.cuh), run on the CPU by tests/cpp/cuda_emulator.h with the launch shapes
// their launchers use (plan_merge, plan_topk). Compared bit for bit with a plain loop that does the same
// arithmetic in the same order -- any indexing, tail, staging or barrier mistake changes bits -- and with guard
// zones around every output. Built with AddressSanitizer (out-of-bounds reads and writes) and, as a second
// binary, ThreadSanitizer (a missing barrier is a data race between the emulated threads). No GPU, no libtorch.

#include "cuda_emulator.h"

#include "cuda/ema_topk_kernel.cuh"
#include "cuda/masked_merge_kernel.cuh"

#include <array>
#include <cmath>
#include <functional>
#include <iostream>
#include <random>
#include <string>
#include <type_traits>

namespace {

using sparse_adapt::kernels::ema_score;
using sparse_adapt::kernels::merged_value;
using sparse_adapt::kernels::topk_key;
using sparse_adapt::kernels::weight_keeps;
namespace mc = sparse_adapt::merge_cuda;
namespace tc = sparse_adapt::topk_cuda;

int failures = 0;

void expect(bool ok, const std::string& what) {
  if (!ok) {
    std::cout << "FAIL  " << what << "\n";
    ++failures;
  }
}

template <typename T>
uint64_t bits(T v) {
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}

template <typename T>
const char* name() {
  if constexpr (std::is_same_v<T, float>)
    return "f32";
  else if constexpr (std::is_same_v<T, double>)
    return "f64";
  else if constexpr (std::is_same_v<T, c10::Half>)
    return "f16";
  else
    return "bf16";
}

template <typename T>
mc::FactorType factor_type() {
  if constexpr (std::is_same_v<T, float>)
    return mc::FactorType::kFloat;
  else if constexpr (std::is_same_v<T, double>)
    return mc::FactorType::kDouble;
  else if constexpr (std::is_same_v<T, c10::Half>)
    return mc::FactorType::kHalf;
  else
    return mc::FactorType::kBFloat16;
}

// A factor as the kernel's load_factor reads it.
template <typename acc_t, typename T>
acc_t to_acc(T v) {
  if constexpr (std::is_same_v<T, double>) {
    return static_cast<acc_t>(v);
  } else {
    return static_cast<acc_t>(static_cast<float>(v));
  }
}

// A buffer with guard zones on both sides, filled with a pattern that must survive. The data starts 64-byte
// aligned, plus `offset` elements (> 0 misaligns it).
template <typename T>
struct Guarded {
  static constexpr size_t kGuard = 256;  // bytes
  std::vector<unsigned char> raw;
  size_t first, last;  // byte range of the data in raw
  Guarded(size_t n, size_t offset = 0) : raw(n * sizeof(T) + offset * sizeof(T) + 2 * kGuard + 64, 0x5A) {
    const auto base = reinterpret_cast<uintptr_t>(raw.data()) + kGuard;
    first = (base + 63) / 64 * 64 - reinterpret_cast<uintptr_t>(raw.data()) + offset * sizeof(T);
    last = first + n * sizeof(T);
  }
  T* get() {
    return reinterpret_cast<T*>(raw.data() + first);
  }
  bool guards_intact() const {
    for (size_t i = 0; i < raw.size(); ++i) {
      if ((i < first || i >= last) && raw[i] != 0x5A) {
        return false;
      }
    }
    return true;
  }
};

// ---------------------------------------------------------------------------------------------- masked merge

template <typename w_t, typename out_t, typename a_t, typename b_t>
void test_merge(
    int64_t rows, int64_t cols, int64_t r, bool with_mask, bool in_place, size_t misalign, std::mt19937& rng) {
  using acc_t = std::conditional_t<std::is_same_v<out_t, double>, double, float>;
  const std::string tag = std::string("merge ") + name<w_t>() + "->" + name<out_t>() + " A " + name<a_t>() + " B " +
                          name<b_t>() + " " + std::to_string(rows) + "x" + std::to_string(cols) +
                          " r=" + std::to_string(r) + (with_mask ? " mask" : "") + (in_place ? " in-place" : "") +
                          (misalign ? " misaligned" : "");
  std::normal_distribution<float> normal;
  std::uniform_real_distribution<float> uniform;
  const size_t n = static_cast<size_t>(rows * cols);
  Guarded<w_t> weight(n, misalign);
  Guarded<bool> mask(n);
  std::vector<a_t> A(static_cast<size_t>(r * cols));
  std::vector<b_t> B(static_cast<size_t>(rows * r));
  for (size_t i = 0; i < n; ++i) {
    weight.get()[i] = static_cast<w_t>(uniform(rng) < 0.5f ? 0.0f : normal(rng));
    mask.get()[i] = uniform(rng) < 0.6f;
  }
  for (auto& v : A)
    v = static_cast<a_t>(normal(rng));
  for (auto& v : B)
    v = static_cast<b_t>(normal(rng));
  const std::vector<w_t> original(weight.get(), weight.get() + n);
  const acc_t scale = static_cast<acc_t>(0.37);

  // What the kernel must produce: the same float operations in the same order.
  std::vector<out_t> expected(n);
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) {
      acc_t delta = 0;
      for (int64_t k = 0; k < r; ++k) {
        delta += to_acc<acc_t>(B[i * r + k]) * to_acc<acc_t>(A[k * cols + j]);
      }
      const w_t w = original[i * cols + j];
      const bool keep = with_mask ? mask.get()[i * cols + j] : weight_keeps<acc_t>(w);
      expected[i * cols + j] = merged_value<out_t>(w, delta, scale, keep);
    }
  }

  Guarded<out_t> out(n, misalign);
  out_t* out_ptr = in_place ? reinterpret_cast<out_t*>(weight.get()) : out.get();
  mc::MergeParams<w_t, out_t, acc_t> p{weight.get(),
                                       A.data(),
                                       B.data(),
                                       with_mask ? mask.get() : nullptr,
                                       out_ptr,
                                       scale,
                                       rows,
                                       cols,
                                       r,
                                       0,
                                       factor_type<a_t>(),
                                       factor_type<b_t>()};
  const bool aligned = reinterpret_cast<uintptr_t>(p.weight) % 16 == 0 && reinterpret_cast<uintptr_t>(p.out) % 16 == 0;
  // A small "device" (2 resident blocks) so that blocks walk several row tiles.
  const mc::MergePlan plan = mc::plan_merge(rows, cols, r, sizeof(acc_t), aligned, 2);
  p.rank_chunk = plan.rank_chunk;
  const dim3 grid(static_cast<unsigned>(plan.col_strips), static_cast<unsigned>(plan.grid_y));
  const dim3 block(mc::kThreadsX, mc::kThreadsY);
  if (!plan.vector) {
    sa_emu::launch(grid, block, plan.smem_bytes, mc::masked_merge_kernel<w_t, out_t, acc_t, false, true>, p);
  } else if (with_mask) {
    sa_emu::launch(grid, block, plan.smem_bytes, mc::masked_merge_kernel<w_t, out_t, acc_t, true, true>, p);
  } else {
    sa_emu::launch(grid, block, plan.smem_bytes, mc::masked_merge_kernel<w_t, out_t, acc_t, true, false>, p);
  }
  size_t wrong = 0;
  for (size_t i = 0; i < n; ++i) {
    wrong += bits(out_ptr[i]) != bits(expected[i]);
  }
  expect(wrong == 0, tag + ": " + std::to_string(wrong) + " elements differ from the reference loop");
  expect(out.guards_intact() && weight.guards_intact(), tag + ": wrote outside the output");
  expect(plan.vector == (aligned && cols % 8 == 0), tag + ": path choice");
  if (!in_place) {
    expect(
        std::equal(original.begin(), original.end(), weight.get(), [](w_t a, w_t b) { return bits(a) == bits(b); }),
        tag + ": weight changed");
  }
}

void merge_suite(std::mt19937& rng) {
  const int64_t shapes[][3] = {{1, 1, 1},     {7, 13, 3},    {33, 300, 8}, {64, 256, 16}, {130, 264, 64},
                               {40, 24, 100}, {70, 520, 65}, {96, 8, 2},   {5, 1024, 1},  {257, 16, 33}};
  // Every dtype combination on every shape would take minutes under the sanitizers: each shape gets two of the
  // four combinations, with and without a mask, rotating, so each combination meets five shapes.
  int turn = 0;
  for (const auto& s : shapes) {
    for (const bool mask : {false, true}) {
      switch (turn++ % 4) {
        case 0:
          test_merge<float, float, float, float>(s[0], s[1], s[2], mask, false, 0, rng);
          break;
        case 1:
          test_merge<c10::BFloat16, c10::BFloat16, c10::BFloat16, c10::BFloat16>(s[0], s[1], s[2], mask, false, 0, rng);
          break;
        case 2:
          test_merge<float, c10::BFloat16, float, float>(s[0], s[1], s[2], mask, false, 0, rng);
          break;
        default:
          test_merge<float, c10::Half, c10::BFloat16, float>(s[0], s[1], s[2], mask, false, 0, rng);
      }
    }
    ++turn;  // shift the pairing, so a combination is not always the masked one
  }
  for (const auto& s : {std::array<int64_t, 3>{33, 64, 8}, std::array<int64_t, 3>{65, 40, 70}}) {
    test_merge<double, double, double, double>(s[0], s[1], s[2], true, false, 0, rng);
    test_merge<c10::Half, c10::Half, c10::Half, float>(s[0], s[1], s[2], false, false, 0, rng);
    test_merge<float, float, float, float>(s[0], s[1], s[2], false, true, 0, rng);  // in place
    test_merge<c10::BFloat16, c10::BFloat16, float, float>(s[0], s[1], s[2], true, true, 0, rng);
    test_merge<float, float, float, float>(s[0], s[1], s[2], true, false, 1, rng);  // misaligned: scalar
    test_merge<c10::BFloat16, c10::BFloat16, float, float>(s[0], s[1], s[2], false, false, 3, rng);
  }
}

// ------------------------------------------------------------------------------------------------- ema_topk_

template <typename T>
struct TopkCase {
  int64_t rows, cols, dim, k;
  std::vector<T> param, grad;
  std::vector<float> score;
};

template <typename T>
void test_topk(const std::vector<std::array<int64_t, 4>>& specs, bool ties, int sms, std::mt19937& rng) {
  using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;
  std::normal_distribution<float> normal;
  std::uniform_real_distribution<float> uniform;
  const float beta = 0.85f;
  std::vector<TopkCase<T>> cases;
  for (const auto& s : specs) {
    TopkCase<T> c{s[0], s[1], s[2], s[3], {}, {}, {}};
    const size_t n = static_cast<size_t>(c.rows * c.cols);
    for (size_t i = 0; i < n; ++i) {
      c.param.push_back(static_cast<T>(normal(rng)));
      c.grad.push_back(static_cast<T>(ties ? std::round(normal(rng)) : normal(rng)));
      c.score.push_back(ties ? std::round(uniform(rng) * 4) / 4 : uniform(rng));
    }
    if (n > 3 && !ties) {
      c.score[n / 2] = NAN;  // ranks lowest
      c.param[n / 3] = T(0);
    }
    cases.push_back(std::move(c));
  }
  // The reference: the same EMA, then a full sort of each slice's keys.
  auto expected = cases;
  for (auto& c : expected) {
    const int64_t slices = c.dim == 1 ? c.rows : c.cols, n = c.dim == 1 ? c.cols : c.rows;
    for (int64_t j = 0; j < slices; ++j) {
      std::vector<uint64_t> keys;
      auto off = [&](int64_t i) { return c.dim == 1 ? j * c.cols + i : i * c.cols + j; };
      for (int64_t i = 0; i < n; ++i) {
        float& sc = c.score[off(i)];
        sc = ema_score<acc_t>(sc, static_cast<acc_t>(c.param[off(i)]), static_cast<acc_t>(c.grad[off(i)]), beta);
        keys.push_back(topk_key(sc, i));
      }
      std::sort(keys.begin(), keys.end(), std::greater<uint64_t>());
      const uint64_t threshold = c.k == 0 ? ~uint64_t(0) : keys[c.k - 1];
      for (int64_t i = 0; i < n; ++i) {
        if (c.k < n && topk_key(c.score[off(i)], i) < threshold) {
          c.param[off(i)] = T(0);
        }
      }
    }
  }
  std::vector<tc::TopkSlices> matrices;
  for (auto& c : cases) {
    const bool rows = c.dim == 1;
    matrices.push_back(
        {c.param.data(), c.grad.data(), c.score.data(), rows ? c.rows : c.cols, rows ? c.cols : c.rows,
         rows ? c.cols : 1, rows ? 1 : c.cols, c.k, 0});
  }
  for (const tc::TopkLaunch& l : tc::plan_topk(matrices, beta, sms)) {
    if (l.warp_teams) {
      sa_emu::launch(dim3(static_cast<unsigned>(l.blocks)), dim3(l.threads), 0, tc::ema_topk_kernel<T, true>, l.batch);
    } else {
      sa_emu::launch(dim3(static_cast<unsigned>(l.blocks)), dim3(l.threads), 0, tc::ema_topk_kernel<T, false>, l.batch);
    }
  }
  for (size_t m = 0; m < cases.size(); ++m) {
    const auto& c = cases[m];
    const std::string tag = std::string("ema_topk ") + name<T>() + " " + std::to_string(c.rows) + "x" +
                            std::to_string(c.cols) + " dim=" + std::to_string(c.dim) + " k=" + std::to_string(c.k) +
                            (ties ? " ties" : "") + " (matrix " + std::to_string(m) + " of " +
                            std::to_string(cases.size()) + ")";
    size_t wrong_param = 0, wrong_score = 0;
    for (size_t i = 0; i < c.param.size(); ++i) {
      wrong_param += bits(c.param[i]) != bits(expected[m].param[i]);
      wrong_score += bits(c.score[i]) != bits(expected[m].score[i]);
    }
    expect(wrong_score == 0, tag + ": " + std::to_string(wrong_score) + " scores differ");
    expect(wrong_param == 0, tag + ": " + std::to_string(wrong_param) + " kept/zeroed entries differ");
  }
}

void topk_suite(std::mt19937& rng) {
  // {rows, cols, dim, k}: warp teams (n <= 1024) and block teams of 128..1024 threads, k = 0 and k = n, n = 1.
  const std::vector<std::array<int64_t, 4>> mixed = {
      {8, 576, 1, 58}, {576, 8, 0, 58}, {16, 40, 1, 4},    {3, 5, 0, 0},      {1, 1, 1, 1},      {64, 1, 1, 1},
      {1, 64, 0, 1},   {12, 33, 1, 33}, {4, 1500, 1, 150}, {1800, 3, 0, 777}, {2, 5000, 1, 4999}};
  for (const bool ties : {false, true}) {
    test_topk<float>(mixed, ties, 132, rng);
    test_topk<c10::BFloat16>(mixed, ties, 1, rng);  // few "SMs": long slices get big block teams
  }
  test_topk<double>({{6, 70, 1, 7}, {1300, 2, 0, 100}}, false, 132, rng);
  test_topk<c10::Half>({{9, 300, 1, 30}, {300, 9, 0, 1}}, true, 132, rng);
  // More matrices than one launch carries (kMaxMatrices): several launches, slices numbered per launch.
  std::vector<std::array<int64_t, 4>> many;
  for (int i = 0; i < 2 * tc::kMaxMatrices + 5; ++i) {
    many.push_back({2 + i % 2, 5 + i % 3, i % 2, 2});
  }
  test_topk<float>(many, false, 132, rng);
}

}  // namespace

int main() {
  std::mt19937 rng(1234);
  const auto t0 = std::chrono::steady_clock::now();
  merge_suite(rng);
  const auto t1 = std::chrono::steady_clock::now();
  topk_suite(rng);
  const auto t2 = std::chrono::steady_clock::now();
  std::cout << "masked_merge " << std::chrono::duration<double>(t1 - t0).count() << " s, ema_topk "
            << std::chrono::duration<double>(t2 - t1).count() << " s\n";
  std::cout << (failures ? "FAILED: " : "all passed: ") << failures << " failures\n";
  return failures ? 1 : 0;
}
