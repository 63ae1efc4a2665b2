#pragma once
// DeepViT (Zhou et al. 2021, arXiv 2103.11886), compatible with the official
// code (zhoudaquan/dvit_repo): a ViT whose blocks may replace self-attention
// by re-attention, Norm(Θᵀ softmax(QKᵀ/√d)) V, with the official key names
// (`blocks.{i}.attn.reatten_matrix`, `blocks.{i}.attn.var_norm`) and the
// optional three-layer convolutional patch stem of deepvit_S / deepvit_L.
#include "models/vit.h"

namespace vitlab {

struct DeepViTOptions : ViTOptions {
  // One flag per block: does it apply Θ + BatchNorm (re-attention)?
  std::vector<bool> apply_transform;
  // Multiply the re-attention map by head_dim^-0.5.
  bool transform_scale = false;
  // Residual scaling s: x + attn(norm1(x*s))/s, x + mlp(norm2(x*s))/s.
  double scale_adjustment = 1.0;
  // PatchEmbed_CNN stem instead of the single patch convolution.
  bool use_cnn_embed = false;

  DeepViTOptions() { mlp_ratio = 3.0; }

  template <class F>
  void visit(F&& f) {
    ViTOptions::visit(f);
    f("apply_transform", apply_transform);
    f("transform_scale", transform_scale);
    f("scale_adjustment", scale_adjustment);
    f("use_cnn_embed", use_cnn_embed);
  }
  void validate() const;
};

// The official PatchEmbed_CNN: conv7x7/2 (64, no bias) + BN + ReLU,
// conv3x3 (64, no bias) + BN + ReLU, then a patch/2 strided projection.
class PatchEmbedCNNImpl : public torch::nn::Module {
 public:
  PatchEmbedCNNImpl(int64_t img_size, int64_t patch_size, int64_t in_chans, int64_t embed_dim);
  torch::Tensor forward(const torch::Tensor& x);
  torch::nn::Conv2d conv1{nullptr}, conv2{nullptr}, proj{nullptr};
  BatchNorm2d bn1{nullptr}, bn2{nullptr};
  int64_t img_size;
};
TORCH_MODULE(PatchEmbedCNN);

class DeepViTImpl : public VisionTransformerImpl {
 public:
  explicit DeepViTImpl(const DeepViTOptions& options);
  const DeepViTOptions& deepvit_options() const { return options_; }

 private:
  DeepViTOptions options_;
};
TORCH_MODULE(DeepViT);

}  // namespace vitlab
