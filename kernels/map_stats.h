#pragma once
// Per-map statistics for the analysis's attention measures
// (analysis/measures.h), on one float32 map while it is in cache: the
// attention kernel hands each map to the analysis's sink from per-thread
// memory, and these read it there, where LibTorch's ops would need the maps
// of a whole batch unpacked from the analysis's layout and read twice more
// (xlogy, then the distance's product and sums): for a 32-block ViT-S at
// batch 32, 1 GB of maps per batch.
#include <cstdint>

namespace vitlab {

struct MapStats {
  double entropy = 0.0;   // Σ over the rows i of -Σ_j a_ij ln a_ij
  double distance = 0.0;  // Σ over patch rows i of Σ_j a_ij d_ij / Σ_j a_ij over patch columns j
};

// map: N x N, row-major; the first `prefix` tokens are not patches, the
// other n = N - prefix are. pixels: n x n row-major distances d between
// patch tokens, or null for no distance.
MapStats map_stats(const float* map, int64_t N, int64_t prefix, const float* pixels);

}  // namespace vitlab
