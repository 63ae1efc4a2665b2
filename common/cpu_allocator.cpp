#include "common/cpu_allocator.h"

#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/Exception.h>
#include <sys/mman.h>
#include <torch/version.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

// PyTorch 2.3 made Allocator::allocate non-const.
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 3)
#define VITLAB_ALLOCATE_CONST
#else
#define VITLAB_ALLOCATE_CONST const
#endif

namespace vitlab {

CpuBlockCache::~CpuBlockCache() {
  while (!free_.empty()) unmap_oldest();
}

void* CpuBlockCache::take(size_t bytes) {
  std::lock_guard<std::mutex> lock(mutex_);
  void* p = reuse(bytes);
  if (!p) p = map(bytes);
  stats_.in_use_bytes += bytes;
  stats_.peak_in_use_bytes = std::max(stats_.peak_in_use_bytes, stats_.in_use_bytes);
  return p;
}

bool CpuBlockCache::give_back(void* p) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = sizes_.find(p);
  if (it == sizes_.end()) return false;
  free_.push_back({p, it->second});
  stats_.in_use_bytes -= it->second;
  return true;
}

CpuBlockCacheStats CpuBlockCache::stats() {
  std::lock_guard<std::mutex> lock(mutex_);
  return stats_;
}

void* CpuBlockCache::reuse(size_t bytes) {
  for (size_t i = free_.size(); i-- > 0;) {  // the most recently freed first
    if (free_[i].bytes != bytes) continue;
    void* p = free_[i].ptr;
    free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(i));
    ++stats_.reuses;
    return p;
  }
  return nullptr;
}

void* CpuBlockCache::map(size_t bytes) {
  const size_t peak = std::max(stats_.peak_in_use_bytes, stats_.in_use_bytes + bytes);
  while (!free_.empty() && stats_.mapped_bytes + bytes > 2 * peak) unmap_oldest();
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) {
    while (!free_.empty()) unmap_oldest();
    p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  }
  TORCH_CHECK(p != MAP_FAILED, "CPU allocator: not enough memory: could not map ", bytes, " bytes (",
              stats_.mapped_bytes, " bytes already mapped): ", std::strerror(errno));
  sizes_[p] = bytes;
  stats_.mapped_bytes += bytes;
  ++stats_.maps;
  return p;
}

void CpuBlockCache::unmap_oldest() {
  const Block b = free_.front();
  free_.erase(free_.begin());
  munmap(b.ptr, b.bytes);
  sizes_.erase(b.ptr);
  stats_.mapped_bytes -= b.bytes;
  ++stats_.unmaps;
}

namespace {

// Never destroyed: tensors may be freed during static destruction.
CpuBlockCache& cache() {
  static auto* c = new CpuBlockCache;
  return *c;
}

// Also raw_deleter(), so it takes malloc's blocks as well.
void release(void* p) {
  if (!cache().give_back(p)) c10::free_cpu(p);
}

size_t page_rounded(size_t bytes) {
  static const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return (bytes + page - 1) / page * page;
}

class CachingCpuAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t bytes) VITLAB_ALLOCATE_CONST override {
    if (bytes < kCachedBlockMin) {
      void* p = c10::alloc_cpu(bytes);
      return {p, p, &c10::free_cpu, c10::Device(c10::DeviceType::CPU)};
    }
    void* p = cache().take(page_rounded(bytes));
    return {p, p, &release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &release; }

  // Pure virtual in newer LibTorch (2.2/2.3), absent in 1.13: declared
  // without `override` so that it builds against both.
  void copy_data(void* dest, const void* src, std::size_t count) const { std::memcpy(dest, src, count); }
};

}  // namespace

c10::Allocator* caching_cpu_allocator() {
  static auto* a = new CachingCpuAllocator;
  return a;
}

}  // namespace vitlab
