#!/usr/bin/env bash
# Builds vitlab against the CUDA PyTorch of a GPU machine and checks it there:
# the whole test suite (with its CUDA cases: fixture parity on the GPU in fp32
# and bf16, training steps in bf16 and fp16), a Fashion-MNIST training run on
# the GPU, and `vitlab bench` on CUDA beside timm. Needs the .gpu folder made by scripts/gpu-prepare.sh on a
# Debian machine, and python3 with torch, CMake, Ninja, nvcc and g++ here.
# Logs and results go to $OUT (default runs/gpu-check).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
G=$root/.gpu
OUT=${OUT:-$root/runs/gpu-check}
BUILD=${BUILD:-build-cuda}
JOBS=${JOBS:-$(nproc)}
mkdir -p "$OUT"
[ -f "$G/opencv/.done" ] && [ -f "$G/sysroot/.done" ] || { echo "gpu-check: run scripts/gpu-prepare.sh first (on Debian)"; exit 1; }

step() { echo "== $(date +%T) $*"; }
step "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' | tee -a "$OUT/gpu.txt"

# The built-in dataset where vitlab looks for it.
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  mkdir -p /usr/share/datasets && cp -r "$G/fashion-mnist" /usr/share/datasets/fashion-mnist
fi
export LD_LIBRARY_PATH="$G/sysroot/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
[ -d /usr/local/cuda/bin ] && export PATH="/usr/local/cuda/bin:$PATH"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$(python3 -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}

step "configure and build ($BUILD)"
torch_prefix=$(python3 -c 'import torch; print(torch.utils.cmake_prefix_path)')
VITLAB_SKIP_DEPS=1 cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$torch_prefix;$G/sysroot/usr;$G/opencv" -DZLIB_ROOT="$G/sysroot/usr" \
  > "$OUT/configure.log" 2>&1 || { tail -40 "$OUT/configure.log"; exit 1; }
grep -i "torch\|cuda" "$OUT/configure.log" | head -20 || true
cmake --build "$BUILD" -j "$JOBS" > "$OUT/build.log" 2>&1 || { grep -B2 -A10 "error" "$OUT/build.log" | head -80; exit 1; }
bin=$BUILD/bin/vitlab
"$bin" --version
[ "${BUILD_ONLY:-0}" = 1 ] && exit 0

if [ "${STUDY_SECONDS:-0}" -gt 0 ]; then
  # The depth-scaling study, 4 members at a time, stopped (checkpointed) after
  # STUDY_SECONDS; its numbers and figures, without weights, in $OUT/study.tgz.
  step "depth-scaling study on the GPU (at most $STUDY_SECONDS s)"
  timeout -s TERM -k 60 "$STUDY_SECONDS" "$bin" study --config configs/depth_scaling_fashion_mnist.yaml \
    --out runs/depth_fmnist --device cuda --jobs 4 > "$OUT/study.log" 2>&1 || echo "gpu-check: study stopped or failed (status $?)"
  tail -5 "$OUT/study.log"
  tar czf "$OUT/study.tgz" --exclude='checkpoint-*' --exclude='*.safetensors' -C runs depth_fmnist
fi

step "test suite (CUDA cases included)"
(cd "$BUILD" && ctest -j "$JOBS" --output-on-failure) > "$OUT/ctest.log" 2>&1 && ok=1 || ok=0
tail -15 "$OUT/ctest.log"
"$BUILD/bin/vitlab_tests" "CUDA*" -s 2>&1 | grep -E "fp32|bf16|passed|failed" | head -20 || true
[ "$ok" = 1 ] || { echo "gpu-check: tests failed (see $OUT/ctest.log)"; exit 1; }

step "Fashion-MNIST on the GPU: configs/fashion_mnist_vit.yaml, bf16"
"$bin" train --config configs/fashion_mnist_vit.yaml --device cuda --amp bf16 --set data.workers=8 \
  --set train.log_interval=200 --set train.epochs="${FMNIST_EPOCHS:-10}" --out "$OUT/fmnist_bf16" > "$OUT/fmnist_bf16.log" 2>&1
tail -3 "$OUT/fmnist_bf16.log"

step "vitlab bench on CUDA (bf16), beside timm under the same PyTorch when it is installed"
for mode in train infer; do
  "$bin" bench --model vit_base_patch16_224 --mode $mode --batch 64 --steps 20 --warmup 5 --device cuda --amp bf16 \
    | tail -1 | tee -a "$OUT/bench.jsonl"
done
if python3 -c 'import timm' 2>/dev/null; then
  python3 - <<'PY' | tee -a "$OUT/bench.jsonl"
import json, statistics, time, timm, torch
for mode in ("train", "infer"):
    m = timm.create_model("vit_base_patch16_224").cuda().train(mode == "train")
    x, y = torch.randn(64, 3, 224, 224, device="cuda"), torch.randint(1000, (64,), device="cuda")
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
    def step():
        with torch.autocast("cuda", torch.bfloat16):
            if mode == "train":
                loss = torch.nn.functional.cross_entropy(m(x).float(), y)
            else:
                with torch.no_grad():
                    m(x)
        if mode == "train":
            opt.zero_grad(); loss.backward(); opt.step()
        torch.cuda.synchronize()
    for _ in range(5): step()
    ms = []
    for _ in range(20):
        t = time.perf_counter(); step(); ms.append(1000 * (time.perf_counter() - t))
    print(json.dumps({"side": "timm", "model": "vit_base_patch16_224", "mode": mode, "batch": 64,
                      "images_per_sec": 64 * 1000 / statistics.mean(ms), "step_ms_median": statistics.median(ms)}))
PY
else
  echo "gpu-check: timm is not installed here; only vitlab's numbers in $OUT/bench.jsonl"
fi
echo "gpu-check: all passed"
