#!/usr/bin/env bash
# Runs each libFuzzer target of a VITLAB_SANITIZE build (tests/fuzz) for
# SECONDS from its seed corpus tests/fuzz/corpus/<target>, JOBS at a time.
# Fails if any finds a crash, a sanitizer report, a leak, a hang (an input
# taking over 10 s) or an allocation over 512 MB. The inputs a fuzzer adds
# stay in BUILD/fuzz/<target>/corpus, its findings in BUILD/fuzz/<target>/findings.
set -euo pipefail
build=$(realpath "${1:?usage: fuzz.sh BUILD [SECONDS] [JOBS]}")
seconds=${2:-60}
jobs=${3:-2}
cd "$(dirname "$0")/.."

# The largest input each target gets: room for its seeds and their mutations,
# small enough that every run is quick.
declare -A max_len=([fuzz_safetensors]=16384 [fuzz_torch_file]=16384 [fuzz_config]=4096
                    [fuzz_idx]=8192 [fuzz_cifar10]=16384 [fuzz_image]=32768)

fuzz_one() {
  local target=$1 out=$build/fuzz/$1
  rm -rf "$out/findings" "$out/ok"
  mkdir -p "$out/corpus" "$out/findings"
  if "$build/bin/$target" "$out/corpus" "tests/fuzz/corpus/$target" -max_total_time="$seconds" \
      -max_len="${max_len[$target]}" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=512 \
      -artifact_prefix="$out/findings/" -print_final_stats=1 >"$out/log" 2>&1; then
    touch "$out/ok"
    echo "fuzz: $target: $(grep -o 'number_of_executed_units: [0-9]*' "$out/log" | grep -o '[0-9]*') inputs in ${seconds} s, nothing found"
  else
    tail -n 80 "$out/log"
    echo "fuzz: $target FOUND A BUG; the input is in $out/findings/ (log: $out/log)"
  fi
}

targets=(fuzz_safetensors fuzz_torch_file fuzz_config fuzz_idx fuzz_cifar10 fuzz_image)
for target in "${targets[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n || true; done
  fuzz_one "$target" &
done
wait
for target in "${targets[@]}"; do [ -e "$build/fuzz/$target/ok" ] || exit 1; done
