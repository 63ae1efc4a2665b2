#include "common/runtime.h"

#include <ATen/Parallel.h>

#include <cstdlib>
#include <cstring>
#include <limits>
#include <thread>

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
#if defined(__GLIBC__)
  const char* tunables = std::getenv("GLIBC_TUNABLES");
  if (tunables && std::strstr(tunables, "glibc.malloc.")) return;
  mallopt(M_MMAP_MAX, 0);
  mallopt(M_TRIM_THRESHOLD, std::numeric_limits<int>::max());
#endif
}

}  // namespace vitlab
