// C++ tests of the ops through the dispatcher, without Python: each op against an ATen expression of its
// definition. Built by CMake (`make cpp`) so that the C++ side cannot rot; run by ctest.

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
  expect(same_shape && err <= tol * std::max(1.0, want.abs().max().item<double>()),
         what + " (max error " + std::to_string(err) + ")");
}

using OptT = std::optional<at::Tensor>;

const auto& merge_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("sparse_adapt::masked_merge", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, double, const OptT&)>();
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
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const OptT&, const at::Tensor&,
                                         const at::Tensor&, double, const OptT&, bool)>();
  return op;
}

const auto& linear_backward_op() {
  using Out = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("sparse_adapt::masked_lora_linear_backward", "")
                       .typed<Out(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                  const at::Tensor&, double, const OptT&, bool, std::array<bool, 5>)>();
  return op;
}

const auto& ema_topk_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("sparse_adapt::ema_topk_", "")
                       .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, double, int64_t, int64_t)>();
  return op;
}

at::Tensor reference_merge(const at::Tensor& w, const at::Tensor& a, const at::Tensor& b, double s, const OptT& m) {
  return w + s * at::mm(b, a) * (m.has_value() ? *m : w.ne(0));
}

void test_merge(at::ScalarType dtype, int64_t out, int64_t in, int64_t r) {
  const std::string tag = std::string(c10::toString(dtype)) + " " + std::to_string(out) + "x" + std::to_string(in) +
                          " r=" + std::to_string(r);
  const auto opts = at::TensorOptions().dtype(dtype);
  at::Tensor w = at::randn({out, in}) * (at::rand({out, in}) > 0.5);
  at::Tensor a = at::randn({r, in}), b = at::randn({out, r});
  const at::Tensor ref = reference_merge(w, a, b, 0.5, std::nullopt);
  w = w.to(opts), a = a.to(opts), b = b.to(opts);
  const double tol = dtype == at::kBFloat16 ? 2e-2 : 1e-5;
  const at::Tensor merged = merge_op().call(w, a, b, 0.5, std::nullopt);
  expect_close(merged, ref, "masked_merge " + tag, tol);
  expect(at::equal(merged.eq(0), w.eq(0)), "masked_merge keeps the zero pattern " + tag);
  at::Tensor inplace = w.clone();
  merge_inplace_op().call(inplace, a, b, 0.5, std::nullopt);
  expect(at::equal(inplace, merged), "masked_merge_ equals masked_merge " + tag);
}

void test_linear() {
  const int64_t out = 24, in = 40, r = 4, tokens = 6;
  const double s = 2.0;
  const at::Tensor w = at::randn({out, in}) * (at::rand({out, in}) > 0.5);
  const at::Tensor a = at::randn({r, in}), b = at::randn({out, r}), x = at::randn({tokens, in});
  const at::Tensor bias = at::randn({out}), gy = at::randn({tokens, out});
  const at::Tensor merged = reference_merge(w, a, b, s, std::nullopt);
  expect_close(linear_op().call(x, w, bias, a, b, s, std::nullopt, false), at::linear(x, merged, bias),
               "masked_lora_linear forward");

  auto [gx, gw, gbias, ga, gb] = linear_backward_op().call(gy, x, w, a, b, s, std::nullopt, false, {true, true, true, true, true});
  expect_close(gx, at::mm(gy, merged), "backward grad_x = gy @ merged");
  expect_close(gw, at::mm(gy.t(), x), "backward grad_weight = gyᵀ x");
  expect_close(gbias, gy.sum(0), "backward grad_bias");
  expect_close(ga, s * at::mm(at::mm(gy, b).t(), x), "LoRS grad_A = s (gy B)ᵀ x");
  expect_close(gb, s * at::mm(gy.t(), at::mm(x, a.t())), "LoRS grad_B = s gyᵀ (x Aᵀ)");

  auto exact = linear_backward_op().call(gy, x, w, a, b, s, std::nullopt, true, {false, false, false, true, true});
  const at::Tensor g = at::mm(gy.t(), x) * w.ne(0);
  expect_close(std::get<3>(exact), s * at::mm(b.t(), g), "exact grad_A = s Bᵀ (G ⊙ M)");
  expect_close(std::get<4>(exact), s * at::mm(g, a.t()), "exact grad_B = s (G ⊙ M) Aᵀ");
  expect(std::get<0>(exact).numel() == 0 && std::get<1>(exact).numel() == 0, "unrequested gradients are empty");
}

void test_ema_topk() {
  const at::Tensor p0 = at::randn({6, 50}), g = at::randn({6, 50}), s0 = at::rand({6, 50});
  for (int64_t dim : {0, 1}) {
    const int64_t k = dim == 1 ? 10 : 2;
    at::Tensor p = p0.clone(), s = s0.clone();
    ema_topk_op().call(p, g, s, 0.8, k, dim);
    expect_close(s, 0.8 * s0 + 0.2 * (p0 * g).abs(), "ema_topk_ score update, dim " + std::to_string(dim));
    // the kept entries are the k largest new scores of each slice (scores are distinct here)
    const at::Tensor kth = std::get<0>(s.topk(k, dim)).narrow(dim, k - 1, 1);
    const at::Tensor keep = s.ge(kth);
    expect(at::equal(p, at::where(keep, p0, at::zeros_like(p0))) && at::equal(keep.sum(dim), at::full({p.size(1 - dim)}, k, at::kLong)),
           "ema_topk_ keeps the top-k of each slice, dim " + std::to_string(dim));
  }
}

void test_errors_name_the_argument() {
  const at::Tensor w = at::randn({8, 6}), a = at::randn({2, 5}), b = at::randn({8, 2});
  std::string message;
  try {
    merge_op().call(w, a, b, 1.0, std::nullopt);
  } catch (const c10::Error& e) {
    message = e.what_without_backtrace();
  }
  expect(message.find("lora_A must have shape") != std::string::npos, "a wrong lora_A is named: " + message);
}

}  // namespace

int main() {
  at::manual_seed(0);
  for (auto dtype : {at::kFloat, at::kDouble, at::kBFloat16}) {
    test_merge(dtype, 33, 300, 8);
    test_merge(dtype, 1, 1, 1);
  }
  test_merge(at::kFloat, 130, 257, 64);
  test_linear();
  test_ema_topk();
  test_errors_name_the_argument();
  std::cout << (failures ? "FAILED: " : "all passed: ") << failures << " failure(s)\n";
  return failures ? 1 : 0;
}
