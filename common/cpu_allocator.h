#pragma once
#include <c10/core/Allocator.h>

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace vitlab {

// LibTorch's CPU allocator with a cache for large blocks, as PyTorch's CUDA
// caching allocator keeps freed blocks for the next step. Blocks of at least
// kCachedBlockMin bytes are mapped on their own and kept when freed; an
// allocation of the same (page-rounded) size takes the most recently freed
// one. Smaller blocks come from malloc, as in LibTorch.
//
// Why not leave every block to glibc's heap (configure_allocator): a heap
// shares its free space with small objects, which split the holes that
// freed activations leave. DeepViT-16B's inference at batch 32 keeping its
// maps peaked at 2,192 or 1,434 MB that way, depending on where earlier
// small allocations had landed (stderr being a file or /dev/null was enough).
// LibTorch 2.15's CPU allocator still hands every block to malloc: there
// this cache (with the untrimmed heap of configure_allocator) makes
// vit_small train 1.05x faster at batch 32, peaking at 2.7 instead of 3.4 GB,
// and infer 1.16x faster (`bench/run.py --kernels`, docs/BENCHMARKS.md).
constexpr size_t kCachedBlockMin = size_t{1} << 20;

c10::Allocator* caching_cpu_allocator();

struct CpuBlockCacheStats {
  size_t mapped_bytes = 0;  // in use + cached
  size_t in_use_bytes = 0, peak_in_use_bytes = 0;
  int64_t maps = 0, reuses = 0, unmaps = 0;
};

// The cache behind caching_cpu_allocator(). A miss maps a new block; before
// that it unmaps cached blocks, oldest first, while mapped memory would
// exceed twice the peak in use at once. Exact sizes repeat from one step to
// the next, so a steady loop maps nothing after its first step; the sum of
// each size's own peak, what that needs, was 1.07-1.35x the peak in use in
// vit_small's and vit_tiny's training and inference.
class CpuBlockCache {
 public:
  ~CpuBlockCache();  // unmaps the cached blocks
  void* take(size_t bytes);
  // False when p is not one of this cache's blocks.
  bool give_back(void* p);
  CpuBlockCacheStats stats();

 private:
  struct Block {
    void* ptr;
    size_t bytes;
  };
  void* reuse(size_t bytes);
  void* map(size_t bytes);
  void unmap_oldest();

  std::mutex mutex_;
  std::vector<Block> free_;  // in the order freed
  std::unordered_map<void*, size_t> sizes_;
  CpuBlockCacheStats stats_;
};

}  // namespace vitlab
