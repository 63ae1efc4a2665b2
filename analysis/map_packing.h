#pragma once
// The attention maps of every block as the similarity analysis reads them:
// packed by column blocks (kernels/cosine.h) where the CPU attention kernel
// hands them over one (image, head) at a time, so that the analysis never
// copies a 60 MB [B, H, T, T] tensor per 224x224 image into that order
// itself; as [B, H, T, T] tensors where a block gives them whole (other
// devices, gradients, DeepViT's softmax maps, fewer than 8 tokens).
#include <torch/torch.h>

#include <vector>

#include "analysis/measures.h"
#include "kernels/map_sink.h"

namespace vitlab {

class PackedMaps : public AttentionMapSink {
 public:
  // measures: when not null and it needs maps, each streamed map of a block
  // whose maps are softmax maps goes to it too, from cache; re-attention
  // blocks' softmax maps, when the applied ones are analysed, are kept
  // apart instead (take_softmax), for the caller to hand it.
  explicit PackedMaps(Map which = Map::applied, MeasureAccumulator* measures = nullptr)
      : which_(which), measures_(measures && measures->needs_maps() ? measures : nullptr) {}
  Map map() const override { return which_; }
  void put(const torch::Tensor& maps) override;
  bool wants_softmax() const override { return measures_ != nullptr && which_ == Map::applied; }
  void put_softmax(const torch::Tensor& maps) override;
  bool streams(int64_t N) const override;
  void begin(int64_t B, int64_t H, int64_t N) override;
  void write(int64_t b, int64_t h, const float* map) override;

  // Each block's maps, packed ([B, H, blocks, T, 8]) or [B, H, T, T], in
  // block order; the sink is empty afterwards.
  std::vector<torch::Tensor> take();
  // After take(): the softmax maps kept by put_softmax, one per block taken
  // (undefined where a block's applied maps are its softmax maps).
  std::vector<torch::Tensor> take_softmax();
  // After take(): whether block l's maps went to the measures as they were
  // streamed.
  bool measured(size_t l) const { return l < taken_measured_.size() && taken_measured_[l]; }

 private:
  // Ends the block whose maps were streamed to the measures, if any.
  void end_measured_block();

  Map which_;
  MeasureAccumulator* measures_;
  std::vector<torch::Tensor> blocks_, softmax_;
  std::vector<bool> measured_, taken_measured_;
  bool measuring_ = false;
  // The block being written: its heads, tokens and packed data.
  int64_t heads_ = 0, tokens_ = 0;
  float* data_ = nullptr;
};

}  // namespace vitlab
