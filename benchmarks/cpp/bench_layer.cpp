// Forward + backward of one adapted linear layer for every method, in C++ against libtorch.
//
// The baselines are written with ATen ops as their papers define them: LoRA (x Wᵀ + s (x Aᵀ) Bᵀ), SQFT (autograd
// through W + s (B A) ⊙ M), SPP (W ⊙ (repeat(A) b) branch); SQFT-gc and SPP-gc recompute their forward in
// backward, as gradient checkpointing does. LoRS calls sparse_adapt::masked_lora_linear and its backward op through
// the dispatcher, inside an autograd Function that saves only its inputs (what ops.py registers in Python).
//
// Every method computes the same gradients (x, lora_A, lora_B). Reported per configuration: median time; the bytes
// saved for backward -- what stays allocated between forward and backward besides the layer's weights and
// adapters and the output, with x an activation that is freed unless saved (exact: counted by a tracking
// allocator on the CPU, by the CUDA caching allocator's counters on a GPU); peak memory during the step on CUDA;
// each as a ratio to LoRA measured in the same run; and the merge kernel's achieved bandwidth next to a copy's.
//
//   bench_layer [--device cpu|cuda] [--quick] [--reps N] [--threads N] [--tokens 512,2048] [--ranks 16,64]
//               [--json out.json]
// On a GPU: bfloat16 at Llama-3-8B's shapes; on a CPU: float32 at a quarter of them. The merge table also times
// the autocast path (an fp32 weight merged straight into bf16) on a GPU.

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/CPUAllocator.h>
#include <torch/torch.h>

#ifdef SPARSE_ADAPT_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#endif

#include <algorithm>
#include <chrono>
#include <cstring>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <map>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

using torch::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptT = std::optional<Tensor>;

namespace {

// ---------------------------------------------------------------------------------------- CPU memory accounting

// Wraps the default CPU allocator and keeps an exact count of the bytes currently allocated. Data pointers stay
// "simple" (context == data), so nothing in ATen can tell the difference.
class TrackingAllocator final : public c10::Allocator {
 public:
  explicit TrackingAllocator(c10::Allocator* base) : base_(base), base_deleter_(base->raw_deleter()) {
    TORCH_CHECK(base_deleter_ != nullptr, "the default CPU allocator has no raw deleter to wrap");
    self() = this;
  }

  c10::DataPtr allocate(size_t n) override {
    c10::DataPtr dp = base_->allocate(n);
    void* p = dp.get();
    dp.release_context();
    {
      std::lock_guard<std::mutex> lock(mu_);
      sizes_[p] = n;
      current_ += static_cast<int64_t>(n);
    }
    return {p, p, &TrackingAllocator::free, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override {
    return &TrackingAllocator::free;
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    std::memcpy(dest, src, count);
  }

  int64_t current() {
    std::lock_guard<std::mutex> lock(mu_);
    return current_;
  }

 private:
  static TrackingAllocator*& self() {
    static TrackingAllocator* instance = nullptr;
    return instance;
  }

  static void free(void* p) {
    TrackingAllocator* t = self();
    {
      std::lock_guard<std::mutex> lock(t->mu_);
      auto it = t->sizes_.find(p);
      if (it != t->sizes_.end()) {
        t->current_ -= static_cast<int64_t>(it->second);
        t->sizes_.erase(it);
      }
    }
    t->base_deleter_(p);
  }

  c10::Allocator* base_;
  c10::DeleterFnPtr base_deleter_;
  std::mutex mu_;
  std::map<void*, size_t> sizes_;
  int64_t current_ = 0;
};

TrackingAllocator* cpu_tracker = nullptr;

struct MemoryProbe {
  bool cuda;
  int64_t current() const {
#ifdef SPARSE_ADAPT_WITH_CUDA
    if (cuda) {
      return c10::cuda::CUDACachingAllocator::getDeviceStats(c10::cuda::current_device()).allocated_bytes[0].current;
    }
#endif
    return cpu_tracker->current();
  }
  void reset_peak() const {
#ifdef SPARSE_ADAPT_WITH_CUDA
    if (cuda) {
      c10::cuda::CUDACachingAllocator::resetPeakStats(c10::cuda::current_device());
    }
#endif
  }
  int64_t peak() const {
#ifdef SPARSE_ADAPT_WITH_CUDA
    if (cuda) {
      return c10::cuda::CUDACachingAllocator::getDeviceStats(c10::cuda::current_device()).allocated_bytes[0].peak;
    }
#endif
    return -1;  // not tracked on the CPU
  }
  void sync() const {
#ifdef SPARSE_ADAPT_WITH_CUDA
    if (cuda) {
      c10::cuda::device_synchronize();
    }
#endif
  }
};

// ------------------------------------------------------------------------------------------------------ methods

Tensor sqft_linear(const Tensor& x, const Tensor& w, const Tensor& a, const Tensor& b, double s) {
  return torch::linear(x, w + torch::mm(b, a) * s * w.ne(0));
}

Tensor spp_branch(const Tensor& x, const Tensor& w, const Tensor& a, const Tensor& b) {
  return torch::linear(x, torch::repeat_interleave(a, w.size(0) / a.size(0), 0) * b * w);
}

// Gradient checkpointing of fn(x, w, a, b): forward without a graph, saving only the inputs; backward recomputes
// fn with grad enabled and differentiates it.
template <Tensor (*fn)(const Tensor&, const Tensor&, const Tensor&, const Tensor&, double)>
struct Checkpointed : torch::autograd::Function<Checkpointed<fn>> {
  static Tensor forward(AutogradContext* ctx, Tensor x, Tensor w, Tensor a, Tensor b, double s) {
    ctx->save_for_backward({x, w, a, b});
    ctx->saved_data["s"] = s;
    return fn(x, w, a, b, s);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad) {
    auto saved = ctx->get_saved_variables();
    Tensor x = saved[0].detach().requires_grad_(), a = saved[2].detach().requires_grad_();
    Tensor b = saved[3].detach().requires_grad_();
    torch::AutoGradMode enable(true);
    Tensor y = fn(x, saved[1], a, b, ctx->saved_data["s"].toDouble());
    auto g = torch::autograd::grad({y}, {x, a, b}, {grad[0]});
    return {g[0], Tensor(), g[1], g[2], Tensor()};
  }
};

Tensor spp_branch_scaled(const Tensor& x, const Tensor& w, const Tensor& a, const Tensor& b, double s) {
  return s * spp_branch(x, w, a, b);
}

const auto& lors_forward_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("sparse_adapt::masked_lora_linear", "")
                       .typed<Tensor(
                           const Tensor&, const Tensor&, const OptT&, const Tensor&, const Tensor&, double, const OptT&,
                           bool, std::optional<c10::ScalarType>)>();
  return op;
}

const auto& lors_backward_op() {
  using Out = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("sparse_adapt::masked_lora_linear_backward", "")
                       .typed<Out(
                           const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, double,
                           const OptT&, bool, std::array<bool, 5>, std::optional<c10::ScalarType>)>();
  return op;
}

struct Lors : torch::autograd::Function<Lors> {
  static Tensor forward(AutogradContext* ctx, Tensor x, Tensor w, Tensor a, Tensor b, double s) {
    ctx->save_for_backward({x, w, a, b});
    ctx->saved_data["s"] = s;
    return lors_forward_op().call(x, w, std::nullopt, a, b, s, std::nullopt, false, std::nullopt);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad) {
    auto v = ctx->get_saved_variables();
    auto [gx, gw, gbias, ga, gb] = lors_backward_op().call(
        grad[0], v[0], v[1], v[2], v[3], ctx->saved_data["s"].toDouble(), std::nullopt, false,
        {true, false, false, true, true}, std::nullopt);
    return {gx, Tensor(), ga, gb, Tensor()};
  }
};

struct Operands {
  Tensor x, w, a, b, spp_a, spp_b;
};

Tensor run_forward(const std::string& method, const Operands& o, double s) {
  if (method == "lora") {
    return torch::linear(o.x, o.w) + s * torch::linear(torch::linear(o.x, o.a), o.b);
  }
  if (method == "sqft") {
    return sqft_linear(o.x, o.w, o.a, o.b, s);
  }
  if (method == "sqft_gc") {
    return Checkpointed<sqft_linear>::apply(o.x, o.w, o.a, o.b, s);
  }
  if (method == "spp") {
    return torch::linear(o.x, o.w) + s * spp_branch(o.x, o.w, o.spp_a, o.spp_b);
  }
  if (method == "spp_gc") {
    return torch::linear(o.x, o.w) + Checkpointed<spp_branch_scaled>::apply(o.x, o.w, o.spp_a, o.spp_b, s);
  }
  if (method == "lors") {
    return Lors::apply(o.x, o.w, o.a, o.b, s);
  }
  TORCH_CHECK(false, "unknown method ", method);
}

const std::vector<std::string> kMethods = {"lora", "sqft", "sqft_gc", "spp", "spp_gc", "lors"};

// ------------------------------------------------------------------------------------------------- measurement

struct Config {
  int64_t out, in, tokens, rank;
};

struct Row {
  Config c;
  std::string method;
  double ms;
  int64_t saved, peak;
};

template <typename F>
double median_ms(F&& f, const MemoryProbe& probe, int warmup, int reps) {
  for (int i = 0; i < warmup; ++i) {
    f();
  }
  probe.sync();
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    probe.sync();
    t.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

Operands make_operands(const Config& c, const torch::TensorOptions& opts) {
  Operands o;
  torch::manual_seed(0);
  auto w = torch::randn({c.out, c.in}) * (torch::rand({c.out, c.in}) >= 0.5);  // 50% unstructured
  o.w = w.to(opts);
  o.x = torch::randn({c.tokens, c.in}).to(opts).requires_grad_();
  o.a = (torch::randn({c.rank, c.in}) / std::sqrt(double(c.rank))).to(opts).requires_grad_();
  o.b = (torch::randn({c.out, c.rank}) / std::sqrt(double(c.rank))).to(opts).requires_grad_();
  o.spp_a = torch::randn({c.rank, c.in}).to(opts).requires_grad_();
  o.spp_b = torch::randn({c.out, 1}).to(opts).requires_grad_();
  return o;
}

Row measure(
    const Config& c, const std::string& method, const torch::TensorOptions& opts, const MemoryProbe& probe, int reps) {
  Operands o = make_operands(c, opts);
  const double s = 2.0;
  const Tensor gy = torch::randn({c.tokens, c.out}, opts);
  auto step = [&] {
    Tensor y = run_forward(method, o, s);
    y.backward(gy);
    for (Tensor* t : {&o.x, &o.a, &o.b, &o.spp_a, &o.spp_b}) {
      t->mutable_grad() = Tensor();
    }
  };
  step();  // first call: lazy initialisation stays out of the memory count
  probe.sync();
  // x as an activation, the output of an earlier layer: after forward it stays alive only if the method saves it.
  Operands m = o;
  m.x = o.x.clone();
  const int64_t x_bytes = static_cast<int64_t>(m.x.nbytes());
  const int64_t before = probe.current();
  probe.reset_peak();
  Tensor y = run_forward(method, m, s);
  m.x = Tensor();
  probe.sync();
  const int64_t saved = probe.current() - before + x_bytes - static_cast<int64_t>(y.nbytes());
  y.backward(gy);
  probe.sync();
  const int64_t peak = probe.peak() < 0 ? -1 : probe.peak() - before;
  y = Tensor();
  step();
  const double ms = median_ms(step, probe, 1, reps);
  return {c, method, ms, saved, peak};
}

std::string mib(int64_t bytes) {
  std::ostringstream os;
  os << std::fixed << std::setprecision(2) << bytes / 1048576.0 << " MiB";
  return os.str();
}

struct Args {
  std::string device = "cpu";
  bool quick = false;
  int reps = 5;
  int threads = 1;
  std::vector<int64_t> tokens, ranks;  // empty: the device's default grid
  std::string json;
};

std::vector<int64_t> int_list(const std::string& text) {
  std::vector<int64_t> out;
  std::stringstream ss(text);
  for (std::string item; std::getline(ss, item, ',');) {
    out.push_back(std::stoll(item));
  }
  return out;
}

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string k = argv[i];
    auto next = [&]() -> std::string {
      TORCH_CHECK(i + 1 < argc, k, " needs a value");
      return argv[++i];
    };
    if (k == "--device")
      a.device = next();
    else if (k == "--quick")
      a.quick = true;
    else if (k == "--reps")
      a.reps = std::stoi(next());
    else if (k == "--threads")
      a.threads = std::stoi(next());
    else if (k == "--json")
      a.json = next();
    else if (k == "--tokens")
      a.tokens = int_list(next());
    else if (k == "--ranks")
      a.ranks = int_list(next());
    else
      TORCH_CHECK(false, "unknown argument ", k, " (see the comment at the top of bench_layer.cpp)");
  }
  return a;
}

}  // namespace

int main(int argc, char** argv) {
  const Args args = parse(argc, argv);
  const bool cuda = args.device == "cuda";
#ifndef SPARSE_ADAPT_WITH_CUDA
  TORCH_CHECK(!cuda, "this build of bench_layer has no CUDA support");
#endif
  TORCH_CHECK(!cuda || torch::cuda::is_available(), "--device cuda but no GPU is available");
  // Never destroyed: tensors freed during static destruction at exit still go through it.
  cpu_tracker = new TrackingAllocator(c10::GetCPUAllocator());
  c10::SetCPUAllocator(cpu_tracker, /*priority=*/100);
  torch::set_num_threads(args.threads);
  const MemoryProbe probe{cuda};
  const auto opts =
      torch::TensorOptions().dtype(cuda ? torch::kBFloat16 : torch::kFloat32).device(cuda ? torch::kCUDA : torch::kCPU);

  // Llama-3-8B projections on a GPU; the same aspect ratios at a quarter of the size on a CPU.
  std::vector<std::pair<int64_t, int64_t>> shapes = {{4096, 4096}, {14336, 4096}, {4096, 14336}};
  std::vector<int64_t> tokens = {512, 1024, 2048}, ranks = {16, 32, 64};
  if (!cuda) {
    shapes = {{1024, 1024}, {3584, 1024}, {1024, 3584}};
    tokens = {128, 256, 512};
  }
  if (args.quick) {
    shapes = {{64, 32}};
    tokens = {16};
    ranks = {4};
  }
  if (!args.tokens.empty()) {
    tokens = args.tokens;
  }
  if (!args.ranks.empty()) {
    ranks = args.ranks;
  }

  std::vector<Row> rows;
  std::cout
      << "| layer (out x in) | tokens | r | method | ms | vs LoRA | saved for backward | vs LoRA | peak | vs LoRA |\n"
      << "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|\n";
  for (auto [out, in] : shapes) {
    for (int64_t t : tokens) {
      for (int64_t r : ranks) {
        const Config c{out, in, t, r};
        std::vector<Row> group;
        for (const auto& m : kMethods) {
          group.push_back(measure(c, m, opts, probe, args.reps));
        }
        const Row& lora = group.front();
        for (const Row& row : group) {
          std::cout << "| " << out << "x" << in << " | " << t << " | " << r << " | " << row.method << " | "
                    << std::fixed << std::setprecision(2) << row.ms << " | " << row.ms / lora.ms << "x | "
                    << mib(row.saved) << " | " << double(row.saved) / double(std::max<int64_t>(lora.saved, 1)) << "x | "
                    << (row.peak < 0 ? std::string("-") : mib(row.peak)) << " | "
                    << (row.peak < 0 ? std::string("-")
                                     : std::to_string(double(row.peak) / lora.peak).substr(0, 4) + "x")
                    << " |\n";
          rows.push_back(row);
        }
      }
    }
  }

  // The merge kernel against a copy of the same bytes (read the weight, write the result): clone for one dtype, a
  // cast for the autocast path (an fp32 weight and adapters merged straight into bf16). Each sample times 10
  // back-to-back calls, so that one synchronisation does not weigh on a ~100 us kernel.
  std::cout << "\n| layer (out x in) | r | weight -> merged | masked_merge ms | GB/s | copy GB/s | of copy |\n"
            << "|---|---:|---|---:|---:|---:|---:|\n";
  static auto merge =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("sparse_adapt::masked_merge", "")
          .typed<Tensor(
              const Tensor&, const Tensor&, const Tensor&, double, const OptT&, std::optional<c10::ScalarType>)>();
  constexpr int kInner = 10;
  std::vector<std::pair<c10::ScalarType, c10::ScalarType>> merge_dtypes = {
      {opts.dtype().toScalarType(), opts.dtype().toScalarType()}};
  if (cuda) {
    merge_dtypes.push_back({torch::kFloat32, torch::kBFloat16});
  }
  std::ostringstream merge_json;
  for (auto [out, in] : shapes) {
    for (int64_t r : ranks) {
      for (auto [from, to] : merge_dtypes) {
        const Operands o = make_operands({out, in, 1, r}, opts.dtype(from));
        const Tensor a = o.a.detach(), b = o.b.detach();
        const std::optional<c10::ScalarType> out_dtype = from == to ? std::nullopt : std::optional(to);
        const double bytes = static_cast<double>(o.w.numel()) * (c10::elementSize(from) + c10::elementSize(to));
        auto run_merge = [&] {
          for (int i = 0; i < kInner; ++i)
            merge.call(o.w, a, b, 1.0, std::nullopt, out_dtype);
        };
        auto run_copy = [&] {
          for (int i = 0; i < kInner; ++i)
            (from == to ? o.w.clone() : o.w.to(to));
        };
        const double ms = median_ms(run_merge, probe, 2, args.reps * 2) / kInner;
        const double copy_ms = median_ms(run_copy, probe, 2, args.reps * 2) / kInner;
        const double gbs = bytes / ms / 1e6, copy_gbs = bytes / copy_ms / 1e6;
        const std::string path = std::string(c10::toString(from)) + " -> " + c10::toString(to);
        std::cout << "| " << out << "x" << in << " | " << r << " | " << path << " | " << std::setprecision(3) << ms
                  << " | " << std::setprecision(1) << gbs << " | " << copy_gbs << " | " << std::setprecision(0)
                  << 100 * gbs / copy_gbs << "% |\n";
        merge_json << (merge_json.tellp() > 0 ? ",\n" : "") << "    {\"out\": " << out << ", \"in\": " << in
                   << ", \"rank\": " << r << ", \"from\": \"" << c10::toString(from) << "\", \"to\": \""
                   << c10::toString(to) << "\", \"ms\": " << ms << ", \"gbs\": " << gbs
                   << ", \"copy_gbs\": " << copy_gbs << "}";
      }
    }
  }

  if (!args.json.empty()) {
    std::ofstream f(args.json);
    f << std::setprecision(6) << "{\n  \"device\": \"" << args.device << "\", \"threads\": " << args.threads
      << ", \"dtype\": \"" << (cuda ? "bfloat16" : "float32") << "\", \"torch\": \"" << TORCH_VERSION
      << "\",\n  \"layers\": [\n";
    for (size_t i = 0; i < rows.size(); ++i) {
      const Row& r = rows[i];
      f << "    {\"out\": " << r.c.out << ", \"in\": " << r.c.in << ", \"tokens\": " << r.c.tokens
        << ", \"rank\": " << r.c.rank << ", \"method\": \"" << r.method << "\", \"ms\": " << r.ms
        << ", \"saved\": " << r.saved << ", \"peak\": " << r.peak << "}" << (i + 1 < rows.size() ? "," : "") << "\n";
    }
    f << "  ],\n  \"merge\": [\n" << merge_json.str() << "\n  ]\n}\n";
  }
  return 0;
}
