# vitlab entry points: `make` builds, `make test` runs the suite, `make demo`
# runs the main job, `make bench` compares vitlab with PyTorch eager and
# rewrites docs/BENCHMARKS.md. Each installs missing Debian packages first.
BUILD ?= build
JOBS ?= $(shell nproc)
CMAKE_ARGS ?=
# Debian's Python, which has python3-torch (not a virtualenv's).
PYTHON ?= /usr/bin/python3
BENCH_ARGS ?=

.PHONY: all build deps test demo bench clean

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

clean:
	rm -rf $(BUILD)
