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
torch::Tensor attention_apply(const torch::Tensor& p, const torch::Tensor& v);

}  // namespace vitlab
