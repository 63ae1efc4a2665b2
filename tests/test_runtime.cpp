#include <catch2/catch.hpp>
#include <cstdlib>

#include "common/runtime.h"

#if defined(__GLIBC__)
#include <malloc.h>
#endif

#if defined(__SANITIZE_ADDRESS__)
#define VITLAB_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define VITLAB_ASAN 1
#endif
#endif

using namespace vitlab;

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
  WARN("not checked: needs glibc >= 2.33's mallinfo2 and no sanitizer allocator");
}
#endif
