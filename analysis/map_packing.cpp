#include "analysis/map_packing.h"

#include <utility>

#include "kernels/cosine.h"

namespace vitlab {

bool PackedMaps::streams(int64_t N) const { return N >= kPackedWidth; }

void PackedMaps::begin(int64_t B, int64_t H, int64_t N) {
  end_measured_block();
  const size_t l = blocks_.size();
  // A re-attention block's streamed maps are not its softmax maps: those
  // came through put_softmax.
  measuring_ = measures_ != nullptr && !(l < softmax_.size() && softmax_[l].defined());
  measured_.resize(l + 1);
  measured_[l] = measuring_;
  if (measuring_) measures_->begin_maps(static_cast<int64_t>(l), B);
  blocks_.push_back(torch::empty({B, H, packed_blocks(N), N, kPackedWidth}, torch::kFloat));
  heads_ = H;
  tokens_ = N;
  data_ = blocks_.back().data_ptr<float>();
}

void PackedMaps::write(int64_t b, int64_t h, const float* map) {
  pack_map_columns(map, tokens_, data_ + (b * heads_ + h) * packed_blocks(tokens_) * tokens_ * kPackedWidth);
  if (measuring_) measures_->map(b, h, map);
}

void PackedMaps::put(const torch::Tensor& maps) {
  end_measured_block();
  blocks_.push_back(maps);
}

void PackedMaps::end_measured_block() {
  if (measuring_) measures_->end_maps();
  measuring_ = false;
}

void PackedMaps::put_softmax(const torch::Tensor& maps) {
  softmax_.resize(blocks_.size() + 1);  // the block about to hand over its applied maps
  softmax_.back() = maps;
}

std::vector<torch::Tensor> PackedMaps::take() {
  end_measured_block();
  data_ = nullptr;
  softmax_.resize(blocks_.size());
  measured_.resize(blocks_.size());
  taken_measured_ = std::exchange(measured_, {});
  return std::exchange(blocks_, {});
}

std::vector<torch::Tensor> PackedMaps::take_softmax() { return std::exchange(softmax_, {}); }

}  // namespace vitlab
