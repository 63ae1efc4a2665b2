#pragma once
// DeepViT's re-attention in training on vitlab's CPU kernels (float32), as
// autograd Functions that save only what their backward cannot recompute
// cheaply: the softmax maps a (and q, k, v), never the re-attended maps
// s · BatchNorm(Θ a + b), nor the gradient of the softmax maps. Both are
// [B, H, N, N], the largest tensors of a re-attention block; recomputing
// them one image at a time, in cache, costs less than storing and reading
// them back. On LibTorch 2.15 (2 threads, batch 32) DeepViT-16B trains
// 1.16x faster with these than with LibTorch's conv2d + BatchNorm + matmul,
// at 4.0 instead of 6.0 GB peak (`bench/run.py --kernels`,
// docs/BENCHMARKS.md). Batch statistics are synchronised across processes
// as BatchNorm2d's (set_batch_norm_sync).
#include <torch/torch.h>

#include "models/layers.h"

namespace vitlab {

// What re-attention computes with: Θ, a 1x1 convolution over the heads
// (`reatten_matrix`: weight [H, H, 1, 1], bias [H]), the BatchNorm over the
// heads (`var_norm`, whose running statistics are updated and batch
// counted) and the scale s.
struct ReAttentionParameters {
  torch::Tensor theta, theta_bias;
  BatchNorm2dImpl& norm;
  double scale;
};

// s · BatchNorm(Θ a + b) of the maps a [B, H, N, N], with batch statistics.
torch::Tensor re_attention_training(const torch::Tensor& a, const ReAttentionParameters& p);
// The same maps applied to v [B, H, N, d]: [B, H, N, d].
torch::Tensor re_attention_apply_training(const torch::Tensor& a, const torch::Tensor& v,
                                          const ReAttentionParameters& p);
// From q, k, v [B, H, N, d]: the softmax maps softmax(attention_scale q kᵀ),
// re-attention and the product with v, [B, H, N, d].
torch::Tensor fused_re_attention_training(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                          double attention_scale, const ReAttentionParameters& p);

}  // namespace vitlab
