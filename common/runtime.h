#pragma once
#include <string>

namespace vitlab {

// vitlab's version, e.g. "0.1.0".
std::string version();

// LibTorch picks one intra-op thread per physical core, which is 1 on a
// 2-vCPU VM; vitlab uses every logical CPU unless told otherwise.
// threads <= 0 means all logical CPUs. Returns the number in effect.
int configure_threads(int threads);

}  // namespace vitlab
