#pragma once
// Multi-head self-attention as timm's Attention, DeepViT's ReAttention as
// the official code (zhoudaquan/dvit_repo) has it, and CaiT's talking-heads
// attention as timm's TalkingHeadAttn, with the same submodule names so that
// state_dict keys match (`attn.qkv`, `attn.proj`, `attn.reatten_matrix`,
// `attn.var_norm`, `attn.proj_l`, `attn.proj_w`).
#include <torch/torch.h>

#include <vector>

#include "kernels/map_sink.h"
#include "models/layers.h"
#include "models/re_attention.h"

namespace vitlab {

struct AttentionOptions {
  int64_t dim = 768;
  int64_t num_heads = 12;
  bool qkv_bias = true;
  double attn_drop = 0.0;
  double proj_drop = 0.0;
};

// qkv in one Linear, the heads' outputs merged and projected by `proj`.
// Two paths, as timm's fused_attn switch: fused, where the maps are never
// stored whole (LibTorch's scaled_dot_product_attention where no map is
// asked for, on LibTorch 2.x; in inference, vitlab's CPU kernel, which
// hands each map to a streaming sink from cache), and explicit (softmax
// maps as a tensor, for dropout, gradients or a sink that takes tensors).
class AttentionImpl : public torch::nn::Module {
 public:
  explicit AttentionImpl(const AttentionOptions& options);
  // maps: when not null, is handed this block's attention maps.
  virtual torch::Tensor forward(const torch::Tensor& x, AttentionMapSink* maps = nullptr);

  AttentionOptions options;
  torch::nn::Linear qkv{nullptr}, proj{nullptr};
  torch::nn::Dropout attn_drop{nullptr}, proj_drop{nullptr};

 protected:
  // q, k, v [B, H, N, d]: the head views of the qkv projection.
  struct Heads {
    torch::Tensor q, k, v;
    double scale;  // d^-0.5
  };
  Heads split_heads(const torch::Tensor& x);
  // The heads' outputs [B, H, N, d] merged ([B, N, C]) and projected.
  torch::Tensor merge_heads(const torch::Tensor& out);
  // Whether vitlab's CPU kernels take these heads (float32 on the CPU).
  static bool on_kernel(const Heads& h);
  // Inference without gradients on the CPU kernels.
  bool kernel_inference(const Heads& h) const;
  // attn_drop(softmax(scale q kᵀ)), [B, H, N, N], on the kernel or LibTorch.
  torch::Tensor softmax_maps(const Heads& h);
  // a v, [B, H, N, d], on the kernel or LibTorch.
  static torch::Tensor apply_maps(const torch::Tensor& a, const torch::Tensor& v);
};
TORCH_MODULE(Attention);

// DeepViT's re-attention (Zhou et al. 2021): after the softmax and
// attention dropout the heads' maps are mixed by Θ (`reatten_matrix`, a 1x1
// convolution over the head axis), normalised by BatchNorm over the heads
// (`var_norm`) and scaled by reatten_scale, then applied to V.
class ReAttentionImpl : public AttentionImpl {
 public:
  ReAttentionImpl(const AttentionOptions& options, double reatten_scale);
  torch::Tensor forward(const torch::Tensor& x, AttentionMapSink* maps = nullptr) override;
  // The re-attended maps of the softmax maps a [B, H, N, N].
  torch::Tensor re_attend(const torch::Tensor& a);
  // The same applied to v [B, H, N, d] ([B, H, N, d]), the re-attended maps
  // never stored on the CPU kernels; a streaming sink is handed them from
  // cache (inference without gradients on the CPU kernels only).
  torch::Tensor re_attend(const torch::Tensor& a, const torch::Tensor& v, AttentionMapSink* maps = nullptr);

  double reatten_scale;
  torch::nn::Conv2d reatten_matrix{nullptr};
  BatchNorm2d var_norm{nullptr};

 private:
  ReAttentionParameters training_parameters();
  // var_norm(reatten_matrix(a)) * reatten_scale, on LibTorch's ops.
  torch::Tensor unfused(const torch::Tensor& a);
  // Θ, BatchNorm with running statistics and the scale folded into one
  // mixing per image, y = w a + c (w [H, H], c [H]), for evaluation.
  std::pair<torch::Tensor, torch::Tensor> folded_mixing() const;
};
TORCH_MODULE(ReAttention);

// CaiT's talking-heads attention (Touvron et al. 2021, after Shazeer et al.
// 2020): the heads' scaled logits q kᵀ are mixed across heads by `proj_l`
// (a Linear over the head axis) before the softmax, the softmax maps by
// `proj_w` after it; those are the maps that multiply V. A sink that asks
// for softmax maps gets the softmax output between the two.
class TalkingHeadAttentionImpl : public AttentionImpl {
 public:
  explicit TalkingHeadAttentionImpl(const AttentionOptions& options);
  torch::Tensor forward(const torch::Tensor& x, AttentionMapSink* maps = nullptr) override;

  torch::nn::Linear proj_l{nullptr}, proj_w{nullptr};
};
TORCH_MODULE(TalkingHeadAttention);

// Collects each block's maps as [B, H, T, T] tensors, in block order.
class AttentionMaps : public AttentionMapSink {
 public:
  explicit AttentionMaps(Map which = Map::applied) : which_(which) {}
  Map map() const override { return which_; }
  void put(const torch::Tensor& maps) override { blocks.push_back(maps); }
  std::vector<torch::Tensor> blocks;

 private:
  Map which_;
};

}  // namespace vitlab
