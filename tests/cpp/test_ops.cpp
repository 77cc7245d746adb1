// C++ tests of the ops through the dispatcher, without Python: each op against an ATen expression of its
// definition. Built by CMake (`make cpp`) so that the C++ side cannot rot; run by ctest on the CPU, and by
// `make gpu-check` with --device cuda (under compute-sanitizer where it exists).
//
//   sparse_adapt_cpp_tests [--device cpu|cuda]

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cmath>
#include <iostream>
#include <optional>
#include <string>

namespace {

int failures = 0;

void expect(bool ok, const std::string& what) {
  std::cout << (ok ? "ok    " : "FAIL  ") << what << "\n";
  failures += ok ? 0 : 1;
}

void expect_close(const at::Tensor& got, const at::Tensor& want, const std::string& what, double tol = 1e-5) {
  const bool same_shape = got.sizes() == want.sizes();
  const double err = same_shape ? (got.to(at::kDouble) - want.to(at::kDouble)).abs().max().item<double>() : INFINITY;
  expect(
      same_shape && err <= tol * std::max(1.0, want.abs().max().item<double>()),
      what + " (max error " + std::to_string(err) + ")");
}

using OptT = std::optional<at::Tensor>;

const auto& merge_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("sparse_adapt::masked_merge", "")
                       .typed<at::Tensor(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, double, const OptT&,
                           std::optional<at::ScalarType>)>();
  return op;
}

const auto& merge_inplace_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("sparse_adapt::masked_merge_", "")
                       .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, double, const OptT&)>();
  return op;
}

const auto& linear_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("sparse_adapt::masked_lora_linear", "")
                       .typed<at::Tensor(
                           const at::Tensor&, const at::Tensor&, const OptT&, const at::Tensor&, const at::Tensor&,
                           double, const OptT&, bool, std::optional<at::ScalarType>)>();
  return op;
}

const auto& linear_backward_op() {
  using Out = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("sparse_adapt::masked_lora_linear_backward", "")
          .typed<Out(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
              const OptT&, bool, std::array<bool, 5>, std::optional<at::ScalarType>)>();
  return op;
}

const auto& ema_topk_op() {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("sparse_adapt::ema_topk_", "")
          .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, double, int64_t, int64_t)>();
  return op;
}

const auto& ema_topk_multi_op() {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("sparse_adapt::ema_topk_multi_", "")
          .typed<void(at::TensorList, at::TensorList, at::TensorList, double, at::IntArrayRef, at::IntArrayRef)>();
  return op;
}

at::Device device = at::kCPU;

at::Tensor reference_merge(const at::Tensor& w, const at::Tensor& a, const at::Tensor& b, double s, const OptT& m) {
  return w + s * at::mm(b, a) * (m.has_value() ? *m : w.ne(0));
}

void test_merge(at::ScalarType dtype, int64_t out, int64_t in, int64_t r) {
  const std::string tag = std::string(c10::toString(dtype)) + " " + std::to_string(out) + "x" + std::to_string(in) +
                          " r=" + std::to_string(r) + " on " + device.str();
  const auto opts = at::TensorOptions().dtype(dtype).device(device);
  at::Tensor w = at::randn({out, in}) * (at::rand({out, in}) > 0.5);
  at::Tensor a = at::randn({r, in}), b = at::randn({out, r});
  const at::Tensor ref = reference_merge(w, a, b, 0.5, std::nullopt);
  const at::Tensor w32 = w.to(device), a32 = a.to(device), b32 = b.to(device);
  w = w.to(opts), a = a.to(opts), b = b.to(opts);
  const double tol = dtype == at::kBFloat16 ? 2e-2 : 1e-5;
  const at::Tensor merged = merge_op().call(w, a, b, 0.5, std::nullopt, std::nullopt);
  expect_close(merged.cpu(), ref, "masked_merge " + tag, tol);
  expect(at::equal(merged.eq(0), w.eq(0)), "masked_merge keeps the zero pattern " + tag);
  at::Tensor inplace = w.clone();
  merge_inplace_op().call(inplace, a, b, 0.5, std::nullopt);
  expect(at::equal(inplace, merged), "masked_merge_ equals masked_merge " + tag);
  if (dtype == at::kBFloat16) {
    // The autocast path: an fp32 weight and fp32 factors merged straight into bf16, one rounding.
    const at::Tensor direct = merge_op().call(w32, a32, b32, 0.5, std::nullopt, at::kBFloat16);
    expect(direct.scalar_type() == at::kBFloat16, "out_dtype gives a bf16 result " + tag);
    expect(
        at::equal(direct.cpu(), ref.to(at::kFloat).to(at::kBFloat16)) ||
            (direct.cpu().to(at::kDouble) - ref).abs().max().item<double>() <= ref.abs().max().item<double>() * 4e-3,
        "fp32 weight merged into bf16 " + tag);
    expect(at::equal(direct.eq(0), w32.eq(0)), "fp32 -> bf16 merge keeps the zero pattern " + tag);
  }
}

void test_linear() {
  const int64_t out = 24, in = 40, r = 4, tokens = 6;
  const double s = 2.0;
  const at::Tensor w = at::randn({out, in}) * (at::rand({out, in}) > 0.5);
  const at::Tensor a = at::randn({r, in}), b = at::randn({out, r}), x = at::randn({tokens, in});
  const at::Tensor bias = at::randn({out}), gy = at::randn({tokens, out});
  const at::Tensor merged = reference_merge(w, a, b, s, std::nullopt);
  const auto d = [](const at::Tensor& t) { return t.to(device); };
  const std::string on = " on " + device.str();
  expect_close(
      linear_op().call(d(x), d(w), d(bias), d(a), d(b), s, std::nullopt, false, std::nullopt).cpu(),
      at::linear(x, merged, bias), "masked_lora_linear forward" + on);

  auto [gx, gw, gbias, ga, gb] = linear_backward_op().call(
      d(gy), d(x), d(w), d(a), d(b), s, std::nullopt, false, {true, true, true, true, true}, std::nullopt);
  expect_close(gx.cpu(), at::mm(gy, merged), "backward grad_x = gy @ merged" + on);
  expect_close(gw.cpu(), at::mm(gy.t(), x), "backward grad_weight = gyᵀ x" + on);
  expect_close(gbias.cpu(), gy.sum(0), "backward grad_bias" + on);
  expect_close(ga.cpu(), s * at::mm(at::mm(gy, b).t(), x), "LoRS grad_A = s (gy B)ᵀ x" + on);
  expect_close(gb.cpu(), s * at::mm(gy.t(), at::mm(x, a.t())), "LoRS grad_B = s gyᵀ (x Aᵀ)" + on);

  auto exact = linear_backward_op().call(
      d(gy), d(x), d(w), d(a), d(b), s, std::nullopt, true, {false, false, false, true, true}, std::nullopt);
  const at::Tensor g = at::mm(gy.t(), x) * w.ne(0);
  expect_close(std::get<3>(exact).cpu(), s * at::mm(b.t(), g), "exact grad_A = s Bᵀ (G ⊙ M)" + on);
  expect_close(std::get<4>(exact).cpu(), s * at::mm(g, a.t()), "exact grad_B = s (G ⊙ M) Aᵀ" + on);
  expect(std::get<0>(exact).numel() == 0 && std::get<1>(exact).numel() == 0, "unrequested gradients are empty" + on);

  // Mixed precision (what autocast passes): bf16 compute, fp32 weight and adapters, fp32 adapter gradients.
  const at::Tensor y16 =
      linear_op().call(d(x).to(at::kBFloat16), d(w), d(bias), d(a), d(b), s, std::nullopt, false, at::kBFloat16);
  expect(y16.scalar_type() == at::kBFloat16, "compute_dtype=bf16 gives a bf16 output" + on);
  expect_close(y16.cpu(), at::linear(x, merged, bias), "compute_dtype=bf16 forward" + on, 3e-2);
  auto mixed = linear_backward_op().call(
      d(gy).to(at::kBFloat16), d(x).to(at::kBFloat16), d(w), d(a), d(b), s, std::nullopt, false,
      {true, false, false, true, true}, at::kBFloat16);
  expect(
      std::get<0>(mixed).scalar_type() == at::kBFloat16 && std::get<3>(mixed).scalar_type() == at::kFloat &&
          std::get<4>(mixed).scalar_type() == at::kFloat,
      "mixed precision: grad_x in bf16, fp32 adapters get fp32 gradients" + on);
}

void test_ema_topk() {
  const at::Tensor p0 = at::randn({6, 50}), g = at::randn({6, 50}), s0 = at::rand({6, 50});
  const std::string on = " on " + device.str();
  for (int64_t dim : {0, 1}) {
    const int64_t k = dim == 1 ? 10 : 2;
    at::Tensor p = p0.to(device, /*non_blocking=*/false, /*copy=*/true), s = s0.to(device, false, true);
    ema_topk_op().call(p, g.to(device), s, 0.8, k, dim);
    expect_close(s.cpu(), 0.8 * s0 + 0.2 * (p0 * g).abs(), "ema_topk_ score update, dim " + std::to_string(dim) + on);
    // the kept entries are the k largest new scores of each slice (scores are distinct here)
    const at::Tensor sc = s.cpu();
    const at::Tensor kth = std::get<0>(sc.topk(k, dim)).narrow(dim, k - 1, 1);
    const at::Tensor keep = sc.ge(kth);
    expect(
        at::equal(p.cpu(), at::where(keep, p0, at::zeros_like(p0))) &&
            at::equal(keep.sum(dim), at::full({p.size(1 - dim)}, k, at::kLong)),
        "ema_topk_ keeps the top-k of each slice, dim " + std::to_string(dim) + on);
  }
  // The multi-tensor form equals one call per matrix.
  std::vector<at::Tensor> ps, gs, ss, ps1, ss1;
  const std::vector<int64_t> ks = {3, 1, 40, 0}, dims = {1, 0, 1, 0};
  for (int i = 0; i < 4; ++i) {
    ps.push_back(at::randn({5 + i, 60 + 10 * i}).to(device));
    gs.push_back(at::randn({5 + i, 60 + 10 * i}).to(device));
    ss.push_back(at::rand({5 + i, 60 + 10 * i}).to(device));
    ps1.push_back(ps.back().clone());
    ss1.push_back(ss.back().clone());
    ema_topk_op().call(ps1.back(), gs.back(), ss1.back(), 0.7, ks[i], dims[i]);
  }
  ema_topk_multi_op().call(ps, gs, ss, 0.7, ks, dims);
  bool same = true;
  for (int i = 0; i < 4; ++i) {
    same = same && at::equal(ps[i], ps1[i]) && at::equal(ss[i], ss1[i]);
  }
  expect(same, "ema_topk_multi_ equals one ema_topk_ per matrix" + on);
}

void test_errors_name_the_argument() {
  const at::Tensor w = at::randn({8, 6}), a = at::randn({2, 5}), b = at::randn({8, 2});
  std::string message;
  try {
    merge_op().call(w, a, b, 1.0, std::nullopt, std::nullopt);
  } catch (const c10::Error& e) {
    message = e.what_without_backtrace();
  }
  expect(message.find("lora_A must have shape") != std::string::npos, "a wrong lora_A is named: " + message);
}

// The in-place merge behaves as an ATen in-place op: it bumps the version, refuses a lora_A that is a view of the
// weight before writing, and keeps a cancelled weight non-zero (the zero pattern in both directions).
void test_merge_in_place_contract() {
  const auto opts = at::TensorOptions().device(device);
  at::Tensor w = at::ones({4, 4}, opts), a = at::ones({1, 4}, opts), b = -at::ones({4, 1}, opts);
  const auto version = w._version();
  merge_inplace_op().call(w, a, b, 1.0, std::nullopt);
  expect(w._version() > version, "masked_merge_ bumps the version counter");
  expect((w != 0).all().item<bool>(), "a weight cancelled to 0 by the merge stays non-zero");
  merge_inplace_op().call(w, a, b, -1.0, std::nullopt);
  expect_close(w, at::ones({4, 4}, opts), "and the unmerge restores it");
  at::Tensor big = at::randn({8, 8}, opts);
  const at::Tensor before = big.clone();
  std::string message;
  try {
    merge_inplace_op().call(big, big.narrow(0, 0, 2), at::randn({8, 2}, opts), 1.0, std::nullopt);
  } catch (const c10::Error& e) {
    message = e.what_without_backtrace();
  }
  expect(
      message.find("weight and lora_A share memory") != std::string::npos && at::equal(big, before),
      "a lora_A that aliases weight is refused before writing: " + message);
}

}  // namespace

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--device" && i + 1 < argc) {
      device = at::Device(argv[++i]);
    } else {
      std::cerr << "usage: sparse_adapt_cpp_tests [--device cpu|cuda]\n";
      return 2;
    }
  }
  at::manual_seed(0);
  for (auto dtype : {at::kFloat, at::kDouble, at::kBFloat16}) {
    test_merge(dtype, 33, 300, 8);
    test_merge(dtype, 1, 1, 1);
  }
  test_merge(at::kFloat, 130, 257, 64);
  test_linear();
  test_ema_topk();
  test_errors_name_the_argument();
  test_merge_in_place_contract();
  std::cout << (failures ? "FAILED: " : "all passed: ") << failures << " failure(s)\n";
  return failures ? 1 : 0;
}
