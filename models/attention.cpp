#include "models/attention.h"

#include <torch/version.h>

#include <cmath>

#include "common/runtime.h"
#include "kernels/attention.h"
#include "kernels/head_mixing.h"
#include "models/re_attention.h"

namespace vitlab {

namespace {

// Per image b, y[b] = w a[b] + c: the H maps a [B, H, N, M] mixed across
// heads by w [H, H], offset by c [H], as one batched product.
torch::Tensor mix_maps(const torch::Tensor& w, const torch::Tensor& c, const torch::Tensor& a) {
  const int64_t B = a.size(0), H = a.size(1), positions = a.size(2) * a.size(3);
  return at::baddbmm(c.view({1, H, 1}).expand({B, H, positions}), w.expand({B, H, H}), a.reshape({B, H, positions}))
      .view(a.sizes());
}

}  // namespace

AttentionImpl::AttentionImpl(const AttentionOptions& o)
    : options(o),
      qkv(register_module("qkv", torch::nn::Linear(torch::nn::LinearOptions(o.dim, 3 * o.dim).bias(o.qkv_bias)))),
      proj(register_module("proj", torch::nn::Linear(o.dim, o.dim))),
      attn_drop(register_module("attn_drop", torch::nn::Dropout(o.attn_drop))),
      proj_drop(register_module("proj_drop", torch::nn::Dropout(o.proj_drop))) {
  TORCH_CHECK(o.dim % o.num_heads == 0, "embed_dim ", o.dim, " is not divisible by num_heads ", o.num_heads);
}

AttentionImpl::Heads AttentionImpl::split_heads(const torch::Tensor& x) {
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2), H = options.num_heads;
  const torch::Tensor t = qkv(x).reshape({B, N, 3, H, C / H}).permute({2, 0, 3, 1, 4});
  return {t[0], t[1], t[2], 1.0 / std::sqrt(static_cast<double>(C / H))};
}

torch::Tensor AttentionImpl::merge_heads(const torch::Tensor& out) {
  return proj_drop(proj(out.transpose(1, 2).reshape({out.size(0), out.size(2), options.dim})));
}

bool AttentionImpl::on_kernel(const Heads& h) { return attention_kernel_applies(h.q, h.k, h.v); }

bool AttentionImpl::kernel_inference(const Heads& h) const {
  return on_kernel(h) && !is_training() && !torch::GradMode::is_enabled();
}

torch::Tensor AttentionImpl::softmax_maps(const Heads& h) {
  return attn_drop(on_kernel(h) ? attention_probs(h.q, h.k, h.scale)
                                : torch::matmul(h.q * h.scale, h.k.transpose(-2, -1)).softmax(-1));
}

torch::Tensor AttentionImpl::apply_maps(const torch::Tensor& a, const torch::Tensor& v) {
  return attention_kernel_applies(a, v, v) ? attention_apply(a, v) : torch::matmul(a, v);
}

torch::Tensor AttentionImpl::forward(const torch::Tensor& x, AttentionMapSink* maps) {
  const Heads h = split_heads(x);
#if TORCH_VERSION_MAJOR >= 2
  // On LibTorch 2.15's CPU build vitlab's kernel is 1.12-1.29x faster than
  // SDPA as an op, but whole ViT steps gain only 1.01x, and in training it
  // keeps the probabilities SDPA does not (vit_small at batch 32: 3.1
  // against 2.7 GB peak); docs/BENCHMARKS.md, "Why each kernel exists".
  if (!maps)
    return merge_heads(at::scaled_dot_product_attention(h.q, h.k, h.v, {}, is_training() ? options.attn_drop : 0.0));
#endif
  if (kernel_inference(h) && (!maps || maps->streams(h.q.size(2))))
    return merge_heads(attention_inference(h.q, h.k, h.v, h.scale, maps));
  const torch::Tensor a = softmax_maps(h);
  if (maps) maps->put(a);
  return merge_heads(apply_maps(a, h.v));
}

ReAttentionImpl::ReAttentionImpl(const AttentionOptions& o, double reatten_scale)
    : AttentionImpl(o), reatten_scale(reatten_scale) {
  reatten_matrix =
      register_module("reatten_matrix", torch::nn::Conv2d(torch::nn::Conv2dOptions(o.num_heads, o.num_heads, 1)));
  var_norm = register_module("var_norm", BatchNorm2d(o.num_heads));
}

torch::Tensor ReAttentionImpl::forward(const torch::Tensor& x, AttentionMapSink* maps) {
  const Heads h = split_heads(x);
  if (!maps && on_kernel(h) && is_training() && options.attn_drop == 0.0)
    return merge_heads(fused_re_attention_training(h.q, h.k, h.v, h.scale, training_parameters()));
  const torch::Tensor a = softmax_maps(h);
  if (!maps) return merge_heads(re_attend(a, h.v));
  if (maps->map() == AttentionMapSink::Map::softmax) {
    maps->put(a);
    return merge_heads(re_attend(a, h.v));
  }
  if (maps->wants_softmax()) maps->put_softmax(a);
  if (kernel_inference(h) && maps->streams(a.size(2))) return merge_heads(re_attend(a, h.v, maps));
  const torch::Tensor y = re_attend(a);
  maps->put(y);
  return merge_heads(apply_maps(y, h.v));
}

ReAttentionParameters ReAttentionImpl::training_parameters() {
  return {reatten_matrix->weight, reatten_matrix->bias, *var_norm, reatten_scale};
}

torch::Tensor ReAttentionImpl::unfused(const torch::Tensor& a) { return var_norm(reatten_matrix(a)) * reatten_scale; }

// Θ, BatchNorm with running statistics and the scale are affine per head:
// in evaluation they fold into one H×H mixing, one pass over the maps
// instead of four (1.5-1.9x faster re-attention, docs/BENCHMARKS.md). In
// training on the CPU kernels, models/re_attention.h does the same with the
// batch statistics.
std::pair<torch::Tensor, torch::Tensor> ReAttentionImpl::folded_mixing() const {
  const int64_t H = options.num_heads;
  const BatchNorm2dImpl& bn = *var_norm;
  const torch::Tensor k = bn.weight * reatten_scale * (bn.running_var + bn.eps).rsqrt();
  return {reatten_matrix->weight.view({H, H}) * k.unsqueeze(1),
          (reatten_matrix->bias - bn.running_mean) * k + bn.bias * reatten_scale};
}

torch::Tensor ReAttentionImpl::re_attend(const torch::Tensor& a) {
  if (is_training())
    return cpu_kernels_enabled() && head_mixing_applies(a) ? re_attention_training(a, training_parameters())
                                                           : unfused(a);
  const auto [w, c] = folded_mixing();
  return mix_maps(w, c, a);
}

torch::Tensor ReAttentionImpl::re_attend(const torch::Tensor& a, const torch::Tensor& v, AttentionMapSink* maps) {
  const bool kernel = cpu_kernels_enabled() && head_mixing_applies(a) && attention_kernel_applies(v, v, v);
  const bool inference_kernel = kernel && !is_training() && !torch::GradMode::is_enabled();
  TORCH_CHECK(!maps || inference_kernel,
              "re-attention: maps are handed over here only in inference on the CPU kernels");
  if (is_training()) {
    if (kernel) return re_attention_apply_training(a, v, training_parameters());
    return apply_maps(unfused(a), v);
  }
  if (inference_kernel) {
    const auto [w, c] = folded_mixing();
    return mixed_attention_apply(w, c, a, v, maps).permute({0, 2, 1, 3});
  }
  return apply_maps(re_attend(a), v);
}

TalkingHeadAttentionImpl::TalkingHeadAttentionImpl(const AttentionOptions& o) : AttentionImpl(o) {
  proj_l = register_module("proj_l", torch::nn::Linear(o.num_heads, o.num_heads));
  proj_w = register_module("proj_w", torch::nn::Linear(o.num_heads, o.num_heads));
}

torch::Tensor TalkingHeadAttentionImpl::forward(const torch::Tensor& x, AttentionMapSink* maps) {
  const Heads h = split_heads(x);
  // timm's Linear over the head axis (heads moved last and back) is this
  // mixing; logits first: the softmax runs on the mixed ones.
  const torch::Tensor logits = torch::matmul(h.q * h.scale, h.k.transpose(-2, -1));
  const torch::Tensor a = mix_maps(proj_l->weight, proj_l->bias, logits).softmax(-1);
  AttentionMapSink* applied = maps;
  if (maps && maps->map() == AttentionMapSink::Map::softmax) {
    maps->put(a);
    applied = nullptr;
  } else if (maps && maps->wants_softmax()) {
    maps->put_softmax(a);
  }
  // In inference the proj_w mixing and the product with v run as one kernel
  // pass (re-attention's), the mixed maps never stored unless a sink that
  // takes tensors wants them.
  if (kernel_inference(h) && (!applied || applied->streams(a.size(2))))
    return merge_heads(mixed_attention_apply(proj_w->weight, proj_w->bias, a, h.v, applied).permute({0, 2, 1, 3}));
  const torch::Tensor mixed = attn_drop(mix_maps(proj_w->weight, proj_w->bias, a));
  if (applied) applied->put(mixed);
  return merge_heads(apply_maps(mixed, h.v));
}

}  // namespace vitlab
