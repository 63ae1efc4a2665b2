#pragma once
// Where a block's attention maps go when a caller asks for them. The models
// hand each block's maps to a sink instead of changing what forward
// returns; a sink that takes maps one at a time lets the CPU attention
// kernel hand over each (image, head) map while it is in cache, so that no
// [B, H, N, N] tensor is ever stored for it (the analysis packs the maps
// into its own layout that way: analysis/map_packing.h).
#include <torch/torch.h>

namespace vitlab {

class AttentionMapSink {
 public:
  virtual ~AttentionMapSink() = default;

  // Which map a block hands over: the one that multiplies V, or the softmax
  // map before DeepViT's re-attention (to compare it with ViT's like for
  // like; the same map in blocks without re-attention).
  enum class Map { applied, softmax };
  virtual Map map() const { return Map::applied; }

  // A block's maps as one tensor, [B, H, N, N].
  virtual void put(const torch::Tensor& maps) = 0;

  // Whether a block whose applied maps are not its softmax maps (DeepViT's
  // re-attention) also hands over the softmax maps [B, H, N, N], through
  // put_softmax before its applied ones, when map() is applied.
  virtual bool wants_softmax() const { return false; }
  virtual void put_softmax(const torch::Tensor& /*maps*/) {}

  // Whether this sink takes the float32 maps of N tokens one at a time: a
  // block then calls begin() once and write() for every (image, head), from
  // several threads at once for distinct pairs, instead of put().
  virtual bool streams(int64_t /*N*/) const { return false; }
  virtual void begin(int64_t /*B*/, int64_t /*H*/, int64_t /*N*/) {}
  // map: image b's map of head h, N x N row-major, valid during the call.
  virtual void write(int64_t /*b*/, int64_t /*h*/, const float* /*map*/) {}
};

}  // namespace vitlab
