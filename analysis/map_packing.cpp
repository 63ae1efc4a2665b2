#include "analysis/map_packing.h"

#include <utility>

#include "kernels/cosine.h"

namespace vitlab {

bool PackedMaps::streams(int64_t N) const { return N >= kPackedWidth; }

void PackedMaps::begin(int64_t B, int64_t H, int64_t N) {
  blocks_.push_back(torch::empty({B, H, packed_blocks(N), N, kPackedWidth}, torch::kFloat));
  heads_ = H;
  tokens_ = N;
  data_ = blocks_.back().data_ptr<float>();
}

void PackedMaps::write(int64_t b, int64_t h, const float* map) {
  pack_map_columns(map, tokens_, data_ + (b * heads_ + h) * packed_blocks(tokens_) * tokens_ * kPackedWidth);
}

std::vector<torch::Tensor> PackedMaps::take() {
  data_ = nullptr;
  return std::exchange(blocks_, {});
}

}  // namespace vitlab
