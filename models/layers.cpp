#include "models/layers.h"

#include <torch/version.h>

#include <cmath>

namespace vitlab {

void trunc_normal_(torch::Tensor tensor, double std, double mean, double a, double b) {
  torch::NoGradGuard no_grad;
  if ((b - mean) / std > 8.0 && (mean - a) / std > 8.0) {
    // Bounds beyond 8σ (timm's ±2 at std .02 are 100σ) cut off under 1e-15 of
    // the mass: a clamped normal is the same distribution, and far faster
    // than the inverse CDF on a billion-parameter model.
    tensor.normal_(mean, std).clamp_(a, b);
    return;
  }
  // Inverse-CDF sampling, as torch.nn.init.trunc_normal_ does.
  auto cdf = [](double x) { return (1.0 + std::erf(x / std::sqrt(2.0))) / 2.0; };
  const double lo = cdf((a - mean) / std), hi = cdf((b - mean) / std);
  tensor.uniform_(2 * lo - 1, 2 * hi - 1);
  tensor.erfinv_();
  tensor.mul_(std * std::sqrt(2.0));
  tensor.add_(mean);
  tensor.clamp_(a, b);
}

torch::Tensor DropPathImpl::forward(const torch::Tensor& x) {
  if (!is_training() || p == 0.0) return x;
  const double keep = 1.0 - p;
  std::vector<int64_t> shape(x.dim(), 1);
  shape[0] = x.size(0);
  torch::Tensor mask = torch::empty(shape, x.options()).bernoulli_(keep);
  if (keep > 0.0) mask.div_(keep);
  return x * mask;
}

MlpImpl::MlpImpl(int64_t dim, int64_t hidden, double p)
    : fc1(register_module("fc1", torch::nn::Linear(dim, hidden))),
      fc2(register_module("fc2", torch::nn::Linear(hidden, dim))),
      drop(register_module("drop", torch::nn::Dropout(p))) {}

torch::Tensor MlpImpl::forward(const torch::Tensor& x) { return drop(fc2(drop(torch::gelu(fc1(x))))); }

PatchEmbedImpl::PatchEmbedImpl(int64_t img_size, int64_t patch_size, int64_t in_chans, int64_t embed_dim)
    : proj(register_module(
          "proj", torch::nn::Conv2d(torch::nn::Conv2dOptions(in_chans, embed_dim, patch_size).stride(patch_size)))),
      img_size(img_size) {}

torch::Tensor PatchEmbedImpl::forward(const torch::Tensor& x) {
  TORCH_CHECK(x.size(2) == img_size && x.size(3) == img_size, "input image is ", x.size(2), "x", x.size(3),
              ", the model expects ", img_size, "x", img_size, " (model.img_size)");
  return proj(x).flatten(2).transpose(1, 2);
}

AttentionImpl::AttentionImpl(const AttentionOptions& o)
    : options(o),
      qkv(register_module("qkv", torch::nn::Linear(torch::nn::LinearOptions(o.dim, 3 * o.dim).bias(o.qkv_bias)))),
      proj(register_module("proj", torch::nn::Linear(o.dim, o.dim))),
      attn_drop(register_module("attn_drop", torch::nn::Dropout(o.attn_drop))),
      proj_drop(register_module("proj_drop", torch::nn::Dropout(o.proj_drop))) {
  TORCH_CHECK(o.dim % o.num_heads == 0, "embed_dim ", o.dim, " is not divisible by num_heads ", o.num_heads);
  if (o.re_attention) {
    reatten_matrix =
        register_module("reatten_matrix", torch::nn::Conv2d(torch::nn::Conv2dOptions(o.num_heads, o.num_heads, 1)));
    var_norm = register_module("var_norm", torch::nn::BatchNorm2d(o.num_heads));
  }
}

torch::Tensor AttentionImpl::forward(const torch::Tensor& x, torch::Tensor* attn) {
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2), H = options.num_heads;
  auto qkv_ = qkv(x).reshape({B, N, 3, H, C / H}).permute({2, 0, 3, 1, 4});
  torch::Tensor q = qkv_[0], k = qkv_[1], v = qkv_[2];
  torch::Tensor out;
#if TORCH_VERSION_MAJOR >= 2
  if (attn == nullptr && !options.re_attention) {
    // Fused kernel (flash / memory-efficient) when no map is asked for.
    out = at::scaled_dot_product_attention(q, k, v, {}, is_training() ? options.attn_drop : 0.0);
  }
#endif
  if (!out.defined()) {
    const double scale = 1.0 / std::sqrt(static_cast<double>(C / H));
    torch::Tensor a = torch::matmul(q * scale, k.transpose(-2, -1)).softmax(-1);
    a = attn_drop(a);
    if (options.re_attention) a = var_norm(reatten_matrix(a)) * options.reatten_scale;
    if (attn) *attn = a;
    out = torch::matmul(a, v);
  }
  return proj_drop(proj(out.transpose(1, 2).reshape({B, N, C})));
}

}  // namespace vitlab
