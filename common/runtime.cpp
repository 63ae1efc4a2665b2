#include "common/runtime.h"

#include <ATen/Parallel.h>
#include <c10/core/CPUAllocator.h>

#include <cstdlib>
#include <cstring>
#include <thread>

#include "common/cpu_allocator.h"
#include "common/sanitizer.h"

#if defined(__GLIBC__)
#include <malloc.h>
#endif

namespace vitlab {

std::string version() { return VITLAB_VERSION; }

int configure_threads(int threads) {
  if (threads <= 0) threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  at::set_num_threads(threads);
  return at::get_num_threads();
}

void configure_allocator() {
  const char* tunables = std::getenv("GLIBC_TUNABLES");
  if (tunables && std::strstr(tunables, "glibc.malloc.")) return;
#if !defined(VITLAB_ASAN)  // ASan checks tensors only in memory from malloc
  c10::SetCPUAllocator(caching_cpu_allocator(), 1);
#endif
#if defined(__GLIBC__)
  mallopt(M_MMAP_MAX, 0);
  // -1 turns trimming off (man mallopt). INT_MAX, the largest positive
  // value, still trimmed whenever more than 2 GB were free at the heap top,
  // which DeepViT-16B's attention capture at batch 32 reached every step.
  mallopt(M_TRIM_THRESHOLD, -1);
#endif
}

bool cpu_kernels_enabled() {
  static const bool enabled = [] {
    const char* value = std::getenv("VITLAB_CPU_KERNELS");
    return value == nullptr || std::string(value) != "0";
  }();
  return enabled;
}

}  // namespace vitlab
