# vitlab entry points: `make` builds, `make test` runs the suite, `make demo`
# runs the main job, `make bench` compares vitlab with PyTorch eager and
# rewrites docs/BENCHMARKS.md. `make test-asan` runs the suite under ASan +
# UBSan and `make fuzz` the libFuzzer targets, from one clang build in
# $(SANITIZE_BUILD). Each installs missing Debian packages first.
BUILD ?= build
JOBS ?= $(shell nproc)
CMAKE_ARGS ?=
# Debian's Python, which has python3-torch (not a virtualenv's).
PYTHON ?= /usr/bin/python3
BENCH_ARGS ?=
SANITIZE_BUILD ?= build-asan
FUZZ_SECONDS ?= 60
# Fuzzers run side by side, this many at a time.
FUZZ_JOBS ?= $(JOBS)

.PHONY: all build deps test demo bench clean sanitize-configure test-asan fuzz

all: build

deps:
	@scripts/install-deps.sh

build: deps
	@mkdir -p $(BUILD)
	@cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release $(CMAKE_ARGS) > $(BUILD)/configure.log 2>&1 || { cat $(BUILD)/configure.log; exit 1; }
	@cmake --build $(BUILD) -j $(JOBS)

test: build
	@cd $(BUILD) && ctest --output-on-failure -j $(JOBS)

demo: build
	@scripts/demo.sh $(BUILD)/bin/vitlab

bench: build
	@scripts/install-deps.sh --bench
	@$(PYTHON) bench/run.py $(BENCH_ARGS)

sanitize-configure:
	@scripts/install-deps.sh --sanitize
	@mkdir -p $(SANITIZE_BUILD)
	@cmake -S . -B $(SANITIZE_BUILD) -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_COMPILER=clang++-14 -DVITLAB_SANITIZE=ON \
		$(CMAKE_ARGS) > $(SANITIZE_BUILD)/configure.log 2>&1 || { cat $(SANITIZE_BUILD)/configure.log; exit 1; }

test-asan: sanitize-configure
	@cmake --build $(SANITIZE_BUILD) -j $(JOBS)
	@cd $(SANITIZE_BUILD) && ctest --output-on-failure -j $(JOBS)

fuzz: sanitize-configure
	@cmake --build $(SANITIZE_BUILD) -j $(JOBS) --target fuzzers
	@scripts/fuzz.sh $(SANITIZE_BUILD) $(FUZZ_SECONDS) $(FUZZ_JOBS)

clean:
	rm -rf $(BUILD) $(SANITIZE_BUILD)
