#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <catch2/catch.hpp>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#include "common/cpu_allocator.h"
#include "common/runtime.h"
#include "common/sanitizer.h"
#include "tests/helpers.h"

#if defined(__GLIBC__)
#include <malloc.h>
#endif

using namespace vitlab;

TEST_CASE("the CPU block cache reuses a freed block of its size and maps at most twice the peak in use") {
  CpuBlockCache cache;
  const size_t mb = size_t{1} << 20;
  void* first = cache.take(3 * mb);
  std::memset(first, 7, 3 * mb);
  CHECK(cache.stats().maps == 1);
  CHECK(cache.give_back(first));
  CHECK_FALSE(cache.give_back(&cache));  // not one of its blocks
  CHECK(cache.take(3 * mb) == first);
  CHECK(cache.stats().reuses == 1);
  CHECK(cache.stats().in_use_bytes == 3 * mb);
  CHECK(cache.give_back(first));

  // Blocks of new sizes one after another, never more than 8 MB in use:
  // the cached ones go, oldest first, once 16 MB would be mapped.
  std::vector<void*> four;
  for (int i = 0; i < 4; ++i) four.push_back(cache.take(2 * mb));
  for (void* p : four) cache.give_back(p);
  CHECK(cache.stats().peak_in_use_bytes == 8 * mb);
  for (size_t n = 1; n <= 6; ++n) {
    void* p = cache.take(n * mb + 4096);
    CHECK(cache.stats().mapped_bytes <= 16 * mb);
    cache.give_back(p);
  }
  const CpuBlockCacheStats s = cache.stats();
  CHECK(s.unmaps >= 5);
  CHECK(s.mapped_bytes <= 16 * mb);
  CHECK(s.in_use_bytes == 0);
  CHECK(s.maps == 5 + 6);
}

TEST_CASE(
    "the CPU allocator caches large blocks only, takes them back from other threads and through the raw interface") {
  c10::Allocator* a = caching_cpu_allocator();
  const size_t bytes = (size_t{5} << 20) + 777;  // a size no other test allocates
  c10::DataPtr p = a->allocate(bytes);
  void* where = p.get();
  CHECK(reinterpret_cast<uintptr_t>(where) % 64 == 0);
  std::memset(where, 1, bytes);
  std::thread([moved = std::move(p)]() mutable { moved.clear(); }).join();
  c10::DataPtr again = a->allocate(bytes);
  CHECK(again.get() == where);
  again.clear();

  c10::DataPtr small = a->allocate(kCachedBlockMin - 1);
  CHECK(small.get_deleter() == &c10::free_cpu);  // malloc's, as LibTorch's own allocator gives it
  small.clear();

  REQUIRE(a->raw_deleter() != nullptr);
  void* raw_small = a->raw_allocate(100);
  std::memset(raw_small, 1, 100);
  a->raw_deallocate(raw_small);
  void* raw = a->raw_allocate(bytes);
  CHECK(raw == where);
  a->raw_deallocate(raw);
  CHECK(a->allocate(bytes).get() == where);
}

#if defined(__GLIBC__) && __GLIBC_PREREQ(2, 33) && !defined(VITLAB_ASAN)
namespace {

// Allocates and frees a block of `bytes` (only its ends touched, so it
// costs no memory): whether it was mapped on its own, and how much heap
// glibc keeps after the free.
struct BigBlock {
  size_t mapped_blocks, heap_after_free;
};

BigBlock big_block(size_t bytes = size_t{64} << 20) {
  const size_t mapped_before = mallinfo2().hblks;
  char* p = static_cast<char*>(std::malloc(bytes));
  REQUIRE(p != nullptr);
  p[0] = p[bytes - 1] = 1;
  const size_t mapped = mallinfo2().hblks - mapped_before;
  std::free(p);
  return {mapped, mallinfo2().arena};
}

}  // namespace

TEST_CASE("configure_allocator keeps freed activations for reuse, unless GLIBC_TUNABLES tunes malloc") {
  // A user's own malloc tunables win: nothing changes, the block is mapped.
  setenv("GLIBC_TUNABLES", "glibc.malloc.perturb=0", 1);
  configure_allocator();
  CHECK(big_block().mapped_blocks == 1);

  unsetenv("GLIBC_TUNABLES");
  configure_allocator();
  CHECK(c10::GetCPUAllocator() == caching_cpu_allocator());
  const BigBlock b = big_block();
  CHECK(b.mapped_blocks == 0);
  CHECK(b.heap_after_free >= size_t{64} << 20);  // not trimmed: the next step reuses it

  // Nor past 2 GB free at the heap top, where a threshold of INT_MAX trimmed.
  const size_t huge = size_t{3} << 30;
  const BigBlock h = big_block(huge);
  CHECK(h.mapped_blocks == 0);
  CHECK(h.heap_after_free >= huge);
}
#else
TEST_CASE("configure_allocator keeps freed activations for reuse, unless GLIBC_TUNABLES tunes malloc") {
  configure_allocator();
  VITLAB_SKIP("needs glibc >= 2.33's mallinfo2 and no sanitizer allocator");
}
#endif
