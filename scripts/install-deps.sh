#!/usr/bin/env bash
# Installs what vitlab builds and runs with; quiet when all is there.
#
#   scripts/install-deps.sh [--torch pypi|debian] [--bench] [--sanitize]
#
# --torch pypi (the default): LibTorch from PyPI's torch wheel, pinned below,
#   in a project-local virtual environment ($VITLAB_VENV, default .venv);
#   `scripts/torch-prefix.sh` prints the CMake prefix it gives. The same
#   environment holds the test tools (TOOL_PINS) with either --torch.
# --torch debian: Debian 12's libtorch-dev 1.13.1.
# --bench: a second environment ($VITLAB_BENCH_VENV, default .venv-bench) with
#   the peers `make bench` and the fixture generator run: torch, torchvision,
#   timm and safetensors from PyPI, pinned below.
# --sanitize: clang with its sanitizer and libFuzzer runtimes, LLVM's OpenMP
#   (clang's -fopenmp needs libomp, not libgomp) and llvm-symbolizer.
# The Debian packages (yaml-cpp, fmt, OpenCV, ...) are always needed.
# VITLAB_SKIP_DEPS=1 skips everything (e.g. with your own LibTorch and libraries).
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_PIN=torch==2.15.0
# The tensorboard_reader test reads event files with TensorBoard's own reader.
TOOL_PINS=(tensorboard==2.21.0)
BENCH_PINS=(torch==2.15.0 torchvision==0.29.2 timm==1.0.31 safetensors==0.8.0 numpy)

torch=pypi bench=0 sanitize=0
while [ $# -gt 0 ]; do
  case "$1" in
    --torch) torch=${2:?--torch needs pypi or debian}; shift 2 ;;
    --torch=*) torch=${1#--torch=}; shift ;;
    --bench) bench=1; shift ;;
    --sanitize) sanitize=1; shift ;;
    *) echo "install-deps: unknown option '$1' (expected --torch pypi|debian, --bench, --sanitize)" >&2; exit 2 ;;
  esac
done
case "$torch" in
  pypi | debian) ;;
  *) echo "install-deps: --torch must be pypi or debian, got '$torch'" >&2; exit 2 ;;
esac
[ "${VITLAB_SKIP_DEPS:-0}" = 1 ] && exit 0

packages=(
  cmake g++ make pkg-config
  libyaml-cpp-dev libfmt-dev nlohmann-json3-dev libcli11-dev zlib1g-dev libzip-dev libjpeg-dev libopencv-dev
  catch2 dataset-fashion-mnist   # the built-in dataset for demos and tests
  libgloo-dev   # the headers of LibTorch's Gloo process group (distributed training); the wheel lacks them
)
# Without OpenBLAS Debian's LibTorch runs the reference BLAS, 20-35x slower.
[ "$torch" = debian ] && packages+=(libtorch-dev libopenblas0-openmp)
packages+=(python3 python3-venv)
[ "$sanitize" = 1 ] && packages+=(clang-14 libclang-rt-14-dev libomp-14-dev llvm-14)

install_debian() {
  if ! command -v dpkg-query >/dev/null 2>&1; then
    echo "install-deps: not a Debian-based system; install the equivalents of: ${packages[*]}" >&2
    return 0
  fi
  local missing=() p
  for p in "${packages[@]}"; do
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null)" = installed ] || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  local sudo=()
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
      sudo=(sudo)
    else
      echo "install-deps: missing packages: ${missing[*]}" >&2
      echo "install-deps: run as root, or install sudo, or: apt-get install ${missing[*]}" >&2
      exit 1
    fi
  fi
  echo "install-deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" apt-get update -qq
  "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# A virtual environment at $1 holding the pins $2...; a stamp file naming
# them makes a rerun with the same pins a no-op and a changed pin reinstall.
install_venv() {
  local venv=$1
  shift
  [ "$(cat "$venv/.vitlab-pins" 2>/dev/null)" = "$*" ] && return 0
  echo "install-deps: installing $* into $venv (PyPI)"
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "$@"
  echo "$*" > "$venv/.vitlab-pins"
}

install_debian
if [ "$torch" = pypi ]; then
  install_venv "${VITLAB_VENV:-.venv}" "$TORCH_PIN" "${TOOL_PINS[@]}"
else
  install_venv "${VITLAB_VENV:-.venv}" "${TOOL_PINS[@]}"
fi
[ "$bench" = 1 ] && install_venv "${VITLAB_BENCH_VENV:-.venv-bench}" "${BENCH_PINS[@]}"
exit 0
