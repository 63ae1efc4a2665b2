# vitlab entry points: `make` builds, `make test` runs the suite, `make demo`
# runs the depth study and the positive control, `make bench` compares vitlab
# with timm and the official DeepViT code and rewrites docs/BENCHMARKS.md,
# `make check-fixtures` regenerates the test fixtures and compares them with
# the committed ones.
# `make test-asan` runs the suite under ASan + UBSan and `make fuzz` the
# libFuzzer targets, from one clang build in $(SANITIZE_BUILD). Each installs
# what is missing first.
#
# TORCH picks the LibTorch: pypi (default) is the one inside PyPI's torch
# wheel, pinned in scripts/install-deps.sh and installed into $(VENV);
# debian is Debian 12's libtorch-dev 1.13.1, built in build-debian/.
TORCH ?= pypi
VENV ?= .venv
ifeq ($(TORCH),debian)
BUILD ?= build-debian
else ifeq ($(TORCH),pypi)
BUILD ?= build
else
$(error TORCH must be pypi or debian, got '$(TORCH)')
endif
# CMake's hint for a LibTorch kind: for pypi the wheel's CMake package and
# its root, whose lib/ is then searched before a system LibTorch's.
torch_cmake_args = $(if $(filter pypi,$(1)),-DCMAKE_PREFIX_PATH="$$(scripts/torch-prefix.sh $(VENV))")
JOBS ?= $(shell nproc)
CMAKE_ARGS ?=
# The peers' environment (torch, torchvision, timm from PyPI).
BENCH_VENV ?= .venv-bench
PYTHON ?= $(BENCH_VENV)/bin/python
BENCH_ARGS ?=
# The sanitizer build uses Debian's LibTorch: CI thereby builds and tests
# both platforms.
SANITIZE_TORCH ?= debian
SANITIZE_BUILD ?= build-asan
FUZZ_SECONDS ?= 60
# Fuzzers run side by side, this many at a time.
FUZZ_JOBS ?= $(JOBS)

.PHONY: all build deps test demo bench check-fixtures clean sanitize-configure test-asan fuzz

all: build

deps:
	@VITLAB_VENV=$(VENV) scripts/install-deps.sh --torch $(TORCH)

build: deps
	@mkdir -p $(BUILD)
	@cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release $(call torch_cmake_args,$(TORCH)) $(CMAKE_ARGS) > $(BUILD)/configure.log 2>&1 || { cat $(BUILD)/configure.log; exit 1; }
	@cmake --build $(BUILD) -j $(JOBS)

test: build
	@cd $(BUILD) && ctest --output-on-failure -j $(JOBS)

demo: build
	@scripts/demo.sh $(BUILD)/bin/vitlab

bench: build
	@VITLAB_VENV=$(VENV) VITLAB_BENCH_VENV=$(BENCH_VENV) scripts/install-deps.sh --torch $(TORCH) --bench
	@$(PYTHON) bench/run.py --vitlab $(BUILD)/bin/vitlab $(BENCH_ARGS)

# The committed tests/fixtures against ones made afresh by timm and
# torch.nn.Transformer (scripts/make_fixtures.py).
check-fixtures:
	@VITLAB_VENV=$(VENV) VITLAB_BENCH_VENV=$(BENCH_VENV) scripts/install-deps.sh --torch $(TORCH) --bench
	@PYTHON=$(PYTHON) scripts/check-fixtures.sh

sanitize-configure:
	@VITLAB_VENV=$(VENV) scripts/install-deps.sh --torch $(SANITIZE_TORCH) --sanitize
	@mkdir -p $(SANITIZE_BUILD)
	@cmake -S . -B $(SANITIZE_BUILD) -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_COMPILER=clang++-14 -DVITLAB_SANITIZE=ON \
		$(call torch_cmake_args,$(SANITIZE_TORCH)) $(CMAKE_ARGS) > $(SANITIZE_BUILD)/configure.log 2>&1 || { cat $(SANITIZE_BUILD)/configure.log; exit 1; }

test-asan: sanitize-configure
	@cmake --build $(SANITIZE_BUILD) -j $(JOBS)
	@cd $(SANITIZE_BUILD) && ctest --output-on-failure -j $(JOBS)

fuzz: sanitize-configure
	@cmake --build $(SANITIZE_BUILD) -j $(JOBS) --target fuzzers
	@scripts/fuzz.sh $(SANITIZE_BUILD) $(FUZZ_SECONDS) $(FUZZ_JOBS)

clean:
	rm -rf $(BUILD) $(SANITIZE_BUILD)
