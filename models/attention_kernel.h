#pragma once
// Scaled dot-product attention on the CPU in float32, as two autograd
// functions so that dropout and DeepViT's re-attention can act on the
// probabilities in between:
//   attention_probs(q, k, scale) = softmax(scale * q k^T)       [B, H, N, N]
//   attention_apply(p, v)        = p v                          [B, H, N, d]
// q, k, v are [B, H, N, d] with any strides (the head views of a qkv
// projection are taken as they are). The result of attention_apply is a
// view of a [B, N, H, d] tensor, so merging the heads back costs no copy.
//
// Why: LibTorch's CPU bmm in builds without MKL (Debian's) multiplies a
// batch one matrix at a time, a select() and a BLAS call each; for ViT's
// many small head matrices that costs more than the arithmetic. Here each
// (batch, head) pair is one task on one thread, its matrices in cache.
#include <torch/torch.h>

namespace vitlab {

// Whether the functions below take these tensors: float32 on the CPU.
bool attention_kernel_applies(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v);

torch::Tensor attention_probs(const torch::Tensor& q, const torch::Tensor& k, double scale);
// The same without autograd, for functions that fuse it with what follows.
torch::Tensor attention_probs_forward(const torch::Tensor& q, const torch::Tensor& k, double scale);
torch::Tensor attention_apply(const torch::Tensor& p, const torch::Tensor& v);

// DeepViT's re-attended maps applied without storing them: per image b,
// y = w a[b] + c mixes the H maps a[b] (w [H, H], c [H], any floating
// type), and the result is y v as [B, N, H, d] (heads merged, not yet
// permuted). The backward recomputes y one image at a time, in cache, and
// returns the gradient of y, dy = dout vᵀ [B, H, N, N], the gradient of v
// [B, H, N, d] and, summed in the same pass, head_gram(dy, 0, a, shift):
// Σ dy (a - shift)ᵀ [H, H] and Σ dy [H] (float64). Saves writing y and
// reading it back twice, and keeping it between the passes
// (docs/BENCHMARKS.md).
torch::Tensor mixed_attention_apply(const torch::Tensor& w, const torch::Tensor& c, const torch::Tensor& a,
                                    const torch::Tensor& v);
struct MixedApplyGrads {
  torch::Tensor dy, dv, cross, dy_sums;
};
MixedApplyGrads mixed_attention_apply_backward(const torch::Tensor& w, const torch::Tensor& c, const torch::Tensor& a,
                                               const torch::Tensor& v, const torch::Tensor& dout, double shift);

// The backward of attention_probs_forward (p its output, contiguous) when
// the gradient of p is a mixing of two map tensors, per image b:
// dp[b] = w1 x1[b] + w2 x2[b] + c (re-attention's gradient of its input
// maps), computed one image at a time in cache instead of stored. Returns
// the gradients of q and k, [B, H, N, d].
std::pair<torch::Tensor, torch::Tensor> attention_probs_backward_mixed(const torch::Tensor& q, const torch::Tensor& k,
                                                                       const torch::Tensor& p, double scale,
                                                                       const torch::Tensor& w1, const torch::Tensor& x1,
                                                                       const torch::Tensor& w2, const torch::Tensor& x2,
                                                                       const torch::Tensor& c);

}  // namespace vitlab
