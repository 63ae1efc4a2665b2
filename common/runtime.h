#pragma once
#include <string>

namespace vitlab {

// vitlab's version, e.g. "0.1.0".
std::string version();

// LibTorch picks one intra-op thread per physical core, which is 1 on a
// 2-vCPU VM; vitlab uses every logical CPU unless told otherwise.
// threads <= 0 means all logical CPUs. Returns the number in effect.
int configure_threads(int threads);

// glibc's malloc maps every block over its (adaptive, at most 32 MB)
// threshold freshly and unmaps it on free, and trims the heap top past
// 128 KB: a ViT step allocates and frees tens of activations that large,
// so each step page-faulted all of them in again (9-12% of CPU time in
// the kernel for vit_tiny inference at batch 32). This keeps freed memory
// for reuse, as PyTorch's caching allocators do: tensors of 1 MB and more
// come from caching_cpu_allocator() (common/cpu_allocator.h), other blocks
// from a heap that is not trimmed, so RSS stays at its peak. Left alone
// where the user set glibc.malloc tunables in GLIBC_TUNABLES; the heap is
// also left alone on other C libraries, and the tensor cache under ASan.
void configure_allocator();

// vitlab's own CPU kernels (attention with maps, DeepViT's re-attention, the
// similarity analysis) run where they apply unless the environment sets
// VITLAB_CPU_KERNELS=0, which takes LibTorch's own ops instead, as timm's
// TIMM_FUSED_ATTN=0 takes its explicit attention: for measuring what each
// kernel gains on a LibTorch version (bench/run.py --kernels) and for
// checking results against LibTorch's. Read once.
bool cpu_kernels_enabled();

}  // namespace vitlab
