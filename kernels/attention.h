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
// Why: LibTorch's CPU bmm in builds without MKL (Debian's 1.13) multiplies
// a batch one matrix at a time, a select() and a BLAS call each; for ViT's
// many small head matrices that costs more than the arithmetic. Here each
// (batch, head) pair is one task on one thread, its matrices in cache.
// On LibTorch 2.15 (MKL), 2 threads, batch 32: as an op 1.14-1.18x faster
// than at::scaled_dot_product_attention in inference and 1.12-1.29x in
// training at ViT-Ti/S/B shapes (`vitlab bench --attention-op`), yet whole
// ViT steps gain only 1.01x, so the models take SDPA where no map is kept;
// keeping the maps (`vitlab analyze`) vit_small infers 1.02x (1.02-1.05x)
// faster than with LibTorch's matmul + softmax, where SDPA cannot serve
// (`bench/run.py --kernels`, docs/BENCHMARKS.md).
#include <torch/torch.h>

#include "kernels/map_sink.h"

namespace vitlab {

// Whether the functions below take these tensors: float32 on the CPU, and
// vitlab's CPU kernels not switched off (cpu_kernels_enabled()).
bool attention_kernel_applies(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v);

torch::Tensor attention_probs(const torch::Tensor& q, const torch::Tensor& k, double scale);
// The same without autograd, for functions that fuse it with what follows.
torch::Tensor attention_probs_forward(const torch::Tensor& q, const torch::Tensor& k, double scale);
torch::Tensor attention_apply(const torch::Tensor& p, const torch::Tensor& v);

// Inference without autograd: softmax(scale * q k^T) v, each (batch, head)
// map in per-thread memory, never stored, so the product reads it from
// cache. When sink is not null it is handed each map from there
// (AttentionMapSink::begin/write). Returns [B, H, N, d], as attention_apply.
torch::Tensor attention_inference(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, double scale,
                                  AttentionMapSink* sink = nullptr);

// DeepViT's re-attended maps applied without storing them: per image b,
// y = w a[b] + c mixes the H maps a[b] (w [H, H], c [H], any floating
// type), and the result is y v as [B, N, H, d] (heads merged, not yet
// permuted). The backward recomputes y one image at a time, in cache, and
// returns the gradient of y, dy = dout vᵀ [B, H, N, N], the gradient of v
// [B, H, N, d] and, summed in the same pass, head_gram(dy, 0, a, shift):
// Σ dy (a - shift)ᵀ [H, H] and Σ dy [H] (float64). Saves writing y and
// reading it back twice, and keeping it between the passes
// (docs/BENCHMARKS.md).
// With sink not null, it is handed each map y from cache, as by
// attention_inference.
torch::Tensor mixed_attention_apply(const torch::Tensor& w, const torch::Tensor& c, const torch::Tensor& a,
                                    const torch::Tensor& v, AttentionMapSink* sink = nullptr);
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
