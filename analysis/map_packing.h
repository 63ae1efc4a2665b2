#pragma once
// The attention maps of every block as the similarity analysis reads them:
// packed by column blocks (kernels/cosine.h) where the CPU attention kernel
// hands them over one (image, head) at a time, so that the analysis never
// copies a 60 MB [B, H, T, T] tensor per 224x224 image into that order
// itself; as [B, H, T, T] tensors where a block gives them whole (other
// devices, gradients, DeepViT's softmax maps, fewer than 8 tokens).
#include <torch/torch.h>

#include <vector>

#include "kernels/map_sink.h"

namespace vitlab {

class PackedMaps : public AttentionMapSink {
 public:
  explicit PackedMaps(Map which = Map::applied) : which_(which) {}
  Map map() const override { return which_; }
  void put(const torch::Tensor& maps) override { blocks_.push_back(maps); }
  bool streams(int64_t N) const override;
  void begin(int64_t B, int64_t H, int64_t N) override;
  void write(int64_t b, int64_t h, const float* map) override;

  // Each block's maps, packed ([B, H, blocks, T, 8]) or [B, H, T, T], in
  // block order; the sink is empty afterwards.
  std::vector<torch::Tensor> take();

 private:
  Map which_;
  std::vector<torch::Tensor> blocks_;
  // The block being written: its heads, tokens and packed data.
  int64_t heads_ = 0, tokens_ = 0;
  float* data_ = nullptr;
};

}  // namespace vitlab
