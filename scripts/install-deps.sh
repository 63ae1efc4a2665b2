#!/usr/bin/env bash
# Installs the Debian packages vitlab builds and runs with; quiet when all are
# there. VITLAB_SKIP_DEPS=1 skips it (e.g. with your own LibTorch and libraries).
set -euo pipefail

packages=(
  cmake g++ make pkg-config
  libtorch-dev libopenblas0-openmp   # without OpenBLAS Debian's LibTorch runs the reference BLAS, 20-35x slower
  libyaml-cpp-dev libfmt-dev nlohmann-json3-dev libcli11-dev zlib1g-dev libzip-dev libjpeg-dev libopencv-dev
  catch2 dataset-fashion-mnist   # the built-in dataset for demos and tests
  libgloo-dev   # the headers of LibTorch's Gloo process group (distributed training)
)

# `make bench` only: PyTorch eager and torchvision for the side-by-side.
[ "${1:-}" = --bench ] && packages+=(python3-torch python3-torchvision python3-pil)
# `make test-asan` and `make fuzz`: clang with its sanitizer and libFuzzer
# runtimes, LLVM's OpenMP (clang's -fopenmp needs libomp, not libgomp) and
# llvm-symbolizer (llvm-14), which puts function names and lines in reports.
[ "${1:-}" = --sanitize ] && packages+=(clang-14 libclang-rt-14-dev libomp-14-dev llvm-14)

[ "${VITLAB_SKIP_DEPS:-0}" = 1 ] && exit 0
if ! command -v dpkg-query >/dev/null 2>&1; then
  echo "install-deps: not a Debian-based system; install the equivalents of: ${packages[*]}" >&2
  exit 0
fi

missing=()
for p in "${packages[@]}"; do
  [ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null)" = installed ] || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -eq 0 ]; then
  sudo=()
elif command -v sudo >/dev/null 2>&1; then
  sudo=(sudo)
else
  echo "install-deps: missing packages: ${missing[*]}" >&2
  echo "install-deps: run as root, or install sudo, or: apt-get install ${missing[*]}" >&2
  exit 1
fi

echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
