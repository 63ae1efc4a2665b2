#pragma once
// CPU float32 kernels for DeepViT's re-attention in training, which mixes
// the H attention maps of each image by an H×H matrix. A [B, H, N, N] map
// tensor is seen as B matrices of H rows of N² values; both kernels make
// one pass over their inputs, split across threads, where LibTorch's 1×1
// convolution, BatchNorm and scale make several (docs/BENCHMARKS.md). With
// the fused re-attention Functions they keep on LibTorch 2.15 (2 threads,
// batch 32): DeepViT-16B trains 1.16x faster than on LibTorch's ops, peaking
// at 4.0 instead of 6.0 GB, and infers 1.09x faster (`bench/run.py --kernels`).
#include <torch/torch.h>

#include <utility>

namespace vitlab {

// Whether the kernels take x: float32 on the CPU.
bool head_mixing_applies(const torch::Tensor& x);

// out[b] = w1 x1[b] + w2 x2[b] + c, per image b: w1, w2 [H, H], c [H] (any
// floating type), x1, x2 [B, H, N, N]; x2 and w2 may be undefined.
torch::Tensor mix_heads(const torch::Tensor& w1, const torch::Tensor& x1, const torch::Tensor& c,
                        const torch::Tensor& w2 = {}, const torch::Tensor& x2 = {});

// Over all images and positions: G[g, h] = Σ (x_g - sx)(y_h - sy) and
// s[g] = Σ (x_g - sx), both float64 ([H, H] and [H]). Shifting by a value
// near the mean keeps one-pass variances accurate (softmax maps have mean
// exactly 1/N). Deterministic: partial sums are added in a fixed order
// whatever the thread count.
std::pair<torch::Tensor, torch::Tensor> head_gram(const torch::Tensor& x, double sx, const torch::Tensor& y, double sy);

// One image's share of mix_heads and of head_gram, on the calling thread,
// for kernels that fuse it with other work on the image: H rows of L values
// (x1, x2, y and out row-major, w row-major float32).
// out[g] = c[g] + Σ_k w[g][k] x1[k], plus Σ_k w[g][H + k] x2[k] when x2 is
// not null (w then [H, 2H], else [H, H]):
void mix_image(int64_t H, const float* w, const float* x1, const float* x2, const float* c, float* out, int64_t L);
// adds Σ (x_g - sx)(y_h - sy) to out[g * H + h] and Σ (x_g - sx) to out[H * H + g]:
void head_gram_image(int64_t H, const float* x, double sx, const float* y, double sy, int64_t L, double* out);

}  // namespace vitlab
