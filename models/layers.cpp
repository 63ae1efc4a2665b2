#include "models/layers.h"

#include <ATen/record_function.h>
#include <torch/version.h>

#include <cmath>

#include "common/runtime.h"
#include "models/attention_kernel.h"
#include "models/head_mixing.h"

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
    var_norm = register_module("var_norm", BatchNorm2d(o.num_heads));
  }
}

namespace {

SumAcrossProcesses& batch_norm_sync() {
  static SumAcrossProcesses sum;
  return sum;
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Batch statistics over every process: the per-channel sums of x and x²
// and the counts are summed across processes in the forward pass, the sums
// of dy and dy·x̂ in the backward pass (as torch.nn.SyncBatchNorm). The
// weight and bias gradients stay per process, to be averaged with the rest.
struct SyncBatchNormFunction : torch::autograd::Function<SyncBatchNormFunction> {
  static torch::Tensor forward(AutogradContext* ctx, torch::Tensor x, torch::Tensor weight, torch::Tensor bias,
                               torch::Tensor running_mean, torch::Tensor running_var, double eps, double momentum) {
    const int64_t C = x.size(1);
    const std::vector<int64_t> dims = {0, 2, 3}, shape = {1, C, 1, 1};
    std::vector<torch::Tensor> stats = {torch::cat(
        {x.sum(dims), (x * x).sum(dims), torch::full({1}, static_cast<double>(x.numel() / C), x.options())})};
    batch_norm_sync()(stats);
    const double total = stats[0][2 * C].item<double>();
    torch::Tensor mean = stats[0].slice(0, 0, C) / total;
    torch::Tensor var = (stats[0].slice(0, C, 2 * C) / total - mean * mean).clamp_min(0.0);
    torch::Tensor invstd = (var + eps).rsqrt();
    torch::Tensor xhat = (x - mean.view(shape)) * invstd.view(shape);
    running_mean.mul_(1.0 - momentum).add_(mean.to(running_mean.dtype()), momentum);
    running_var.mul_(1.0 - momentum)
        .add_((var * (total / std::max(total - 1.0, 1.0))).to(running_var.dtype()), momentum);
    ctx->save_for_backward({xhat, invstd, weight});
    ctx->saved_data["total"] = total;
    return xhat * weight.view(shape) + bias.view(shape);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const torch::Tensor &xhat = saved[0], &invstd = saved[1], &weight = saved[2];
    const double total = ctx->saved_data["total"].toDouble();
    const torch::Tensor& dy = grads[0];
    const int64_t C = dy.size(1);
    const std::vector<int64_t> dims = {0, 2, 3}, shape = {1, C, 1, 1};
    const torch::Tensor sum_dy = dy.sum(dims), sum_dy_xhat = (dy * xhat).sum(dims);
    std::vector<torch::Tensor> sums = {torch::cat({sum_dy, sum_dy_xhat})};
    batch_norm_sync()(sums);
    const torch::Tensor mean_dy = sums[0].slice(0, 0, C) / total, mean_dy_xhat = sums[0].slice(0, C, 2 * C) / total;
    torch::Tensor dx = (dy - mean_dy.view(shape) - xhat * mean_dy_xhat.view(shape)) * (invstd * weight).view(shape);
    return {dx, sum_dy_xhat, sum_dy, torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

// DeepViT's re-attention in training, s · BatchNorm(Θ a + b) over the maps a
// [B, H, N, N], without storing Θ a. With ã = a - 1/N (centred for softmax
// maps, so one-pass moments lose no precision), every term is affine in ã:
// the batch statistics follow from Σ ã ãᵀ and Σ ã (one pass), the output is
// one H×H mixing of a (one pass), and the backward needs Σ dy ãᵀ and Σ dy
// (one pass) and one mixing of dy and a for the gradient of a. Statistics
// are synchronised across processes as in SyncBatchNormFunction.
//
// ReAttentionApplyFunction goes on to apply the re-attended maps to v
// ([B, N, H, d], as attention_apply before its permute) without ever
// storing them (mixed_attention_apply): its backward recomputes them.
// On LibTorch 2.15 (2 threads, batch 32) DeepViT-16B trains 1.16x faster
// with these than with LibTorch's conv2d + BatchNorm + matmul, at 4.0
// instead of 6.0 GB peak (`bench/run.py --kernels`, docs/BENCHMARKS.md).

// What both functions' forward passes share: the batch statistics, the
// running statistics' update and what the backward needs (in ctx). Returns
// the mixing [H, H] and the offset [H] (float64) of the output maps,
// y = mix a + offset per image.
std::pair<torch::Tensor, torch::Tensor> re_attention_mixing(AutogradContext* ctx, const torch::Tensor& a,
                                                            const torch::Tensor& theta, const torch::Tensor& theta_bias,
                                                            const torch::Tensor& weight, const torch::Tensor& bias,
                                                            torch::Tensor running_mean, torch::Tensor running_var,
                                                            double eps, double momentum, double scale) {
  const int64_t H = a.size(1);
  const double shift = 1.0 / static_cast<double>(a.size(2)), count = static_cast<double>(a.numel() / H);
  auto [moments, sums] = head_gram(a, shift, a, shift);  // Σ ã ãᵀ, Σ ã over this process's batch
  std::vector<torch::Tensor> stats = {torch::cat({sums, moments.flatten(), torch::full({1}, count, torch::kDouble)})};
  if (batch_norm_sync()) batch_norm_sync()(stats);
  const double total = stats[0][H * H + H].item<double>();
  const torch::Tensor mean = stats[0].slice(0, 0, H) / total;  // of ã
  const torch::Tensor cov = stats[0].slice(0, H, H + H * H).view({H, H}) / total - torch::outer(mean, mean);
  const torch::Tensor T = theta.reshape({H, H}).to(torch::kDouble);
  const torch::Tensor var = (T.mm(cov) * T).sum(1).clamp_min(0.0);  // of Θ a + b, per head
  const torch::Tensor invstd = (var + eps).rsqrt(), k = weight.to(torch::kDouble) * scale * invstd;
  const torch::Tensor mix = k.unsqueeze(1) * T, offset = bias.to(torch::kDouble) * scale - mix.mv(mean + shift);
  running_mean.mul_(1.0 - momentum)
      .add_((T.mv(mean + shift) + theta_bias.to(torch::kDouble)).to(running_mean.dtype()), momentum);
  running_var.mul_(1.0 - momentum).add_((var * (total / std::max(total - 1.0, 1.0))).to(running_var.dtype()), momentum);
  for (auto& [name, value] : {std::pair{"theta", T},
                              {"mean", mean},
                              {"invstd", invstd},
                              {"k", k},
                              {"moments", moments},
                              {"sums", sums},
                              {"mix", mix},
                              {"offset", offset}})
    ctx->saved_data[name] = value;
  ctx->saved_data["total"] = total;
  ctx->saved_data["scale"] = scale;
  return {mix, offset};
}

// The inputs after the parameters: the running statistics, eps, momentum
// and the scale, which get no gradient.
constexpr size_t kReAttentionConstants = 5;

// What the backward passes share: from the maps a, Σ dy ãᵀ (cross) and
// Σ dy, where dy is the gradient of the output maps, the gradient of a as
// a mixing, da = w1 dy + w2 a + c per image (float64 [H, H], [H, H], [H]),
// and those of Θ, Θ's bias and BatchNorm's weight and bias.
struct ReAttentionGrads {
  torch::Tensor w1, w2, c;
  variable_list parameters;
};

ReAttentionGrads re_attention_gradients(AutogradContext* ctx, const torch::Tensor& a, const torch::Tensor& cross,
                                        const torch::Tensor& dy_sums) {
  auto saved = [&](const char* name) { return ctx->saved_data[name].toTensor(); };
  const torch::Tensor T = saved("theta"), mean = saved("mean"), k = saved("k"), moments = saved("moments"),
                      sums = saved("sums");
  const double total = ctx->saved_data["total"].toDouble(), scale = ctx->saved_data["scale"].toDouble();
  const int64_t H = a.size(1);
  const double shift = 1.0 / static_cast<double>(a.size(2)), count = static_cast<double>(a.numel() / H);
  const torch::Tensor wz = saved("invstd").unsqueeze(1) * T, cz = -wz.mv(mean);  // ẑ = wz ã + cz
  const torch::Tensor dy_zhat = (wz * cross).sum(1) + cz * dy_sums;              // Σ dy ẑ
  std::vector<torch::Tensor> global = {torch::cat({dy_sums, dy_zhat})};
  if (batch_norm_sync()) batch_norm_sync()(global);
  // The gradient of Θ a + b: dz = k dy - m1 - m2 ẑ = k dy - qz ã - rz.
  const torch::Tensor m1 = k * global[0].slice(0, 0, H) / total, m2 = k * global[0].slice(0, H) / total;
  const torch::Tensor qz = m2.unsqueeze(1) * wz, rz = m1 + m2 * cz;
  // da = Θᵀ dz = Θᵀ diag(k) dy + q (a - 1/N) - Θᵀ rz
  const torch::Tensor Tt = T.t(), q = -Tt.mm(qz);
  // dΘ = Σ dz aᵀ = Σ dz ãᵀ + (Σ dz) 1ᵀ / N, over this process's batch
  const torch::Tensor dz_sum = k * dy_sums - qz.mv(sums) - rz * count;
  const torch::Tensor dtheta =
      k.unsqueeze(1) * cross - qz.mm(moments) - torch::outer(rz, sums) + shift * dz_sum.unsqueeze(1);
  auto f32 = [](const torch::Tensor& t) { return t.to(torch::kFloat); };
  return {Tt * k.unsqueeze(0),
          q,
          -q.sum(1) * shift - Tt.mv(rz),
          {f32(dtheta).view({H, H, 1, 1}), f32(dz_sum), f32(dy_zhat * scale), f32(dy_sums * scale)}};
}

// The gradients a function returns: those of its map and tensor inputs
// (`inputs`), the parameters', and none for the constants after them.
variable_list with_parameters(variable_list inputs, const ReAttentionGrads& g) {
  inputs.insert(inputs.end(), g.parameters.begin(), g.parameters.end());
  inputs.resize(inputs.size() + kReAttentionConstants);
  return inputs;
}

struct ReAttentionFunction : torch::autograd::Function<ReAttentionFunction> {
  static torch::Tensor forward(AutogradContext* ctx, torch::Tensor a, torch::Tensor theta, torch::Tensor theta_bias,
                               torch::Tensor weight, torch::Tensor bias, torch::Tensor running_mean,
                               torch::Tensor running_var, double eps, double momentum, double scale) {
    RECORD_USER_SCOPE("vitlab::re_attention");
    a = a.contiguous();
    auto [mix, offset] =
        re_attention_mixing(ctx, a, theta, theta_bias, weight, bias, running_mean, running_var, eps, momentum, scale);
    ctx->save_for_backward({a});
    return mix_heads(mix, a, offset);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const torch::Tensor a = ctx->get_saved_variables()[0], dy = grads[0].contiguous();
    auto [cross, dy_sums] = head_gram(dy, 0.0, a, 1.0 / static_cast<double>(a.size(2)));  // Σ dy ãᵀ, Σ dy
    const ReAttentionGrads g = re_attention_gradients(ctx, a, cross, dy_sums);
    return with_parameters({mix_heads(g.w1, dy, g.c, g.w2, a)}, g);
  }
};

struct ReAttentionApplyFunction : torch::autograd::Function<ReAttentionApplyFunction> {
  static torch::Tensor forward(AutogradContext* ctx, torch::Tensor a, torch::Tensor v, torch::Tensor theta,
                               torch::Tensor theta_bias, torch::Tensor weight, torch::Tensor bias,
                               torch::Tensor running_mean, torch::Tensor running_var, double eps, double momentum,
                               double scale) {
    RECORD_USER_SCOPE("vitlab::re_attention_apply");
    a = a.contiguous();
    auto [mix, offset] =
        re_attention_mixing(ctx, a, theta, theta_bias, weight, bias, running_mean, running_var, eps, momentum, scale);
    ctx->save_for_backward({a, v});
    return mixed_attention_apply(mix, offset, a, v);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto inputs = ctx->get_saved_variables();
    const torch::Tensor &a = inputs[0], &v = inputs[1];
    const MixedApplyGrads m =
        mixed_attention_apply_backward(ctx->saved_data["mix"].toTensor(), ctx->saved_data["offset"].toTensor(), a, v,
                                       grads[0], 1.0 / static_cast<double>(a.size(2)));
    const ReAttentionGrads g = re_attention_gradients(ctx, a, m.cross, m.dy_sums);
    return with_parameters({mix_heads(g.w1, m.dy, g.c, g.w2, a), m.dv}, g);
  }
};

// The whole of a re-attention block's attention in training, from q, k, v
// to the output ([B, N, H, d], as attention_apply before its permute): the
// softmax maps a, re-attention and the product with v. Beyond
// ReAttentionApplyFunction, the gradient of a is never stored either: the
// softmax's backward mixes it from dy and a one image at a time, in cache.
struct FusedReAttentionFunction : torch::autograd::Function<FusedReAttentionFunction> {
  static torch::Tensor forward(AutogradContext* ctx, torch::Tensor q, torch::Tensor k, torch::Tensor v,
                               torch::Tensor theta, torch::Tensor theta_bias, torch::Tensor weight, torch::Tensor bias,
                               torch::Tensor running_mean, torch::Tensor running_var, double eps, double momentum,
                               double scale, double attention_scale) {
    RECORD_USER_SCOPE("vitlab::fused_re_attention");
    const torch::Tensor a = attention_probs_forward(q, k, attention_scale);
    auto [mix, offset] =
        re_attention_mixing(ctx, a, theta, theta_bias, weight, bias, running_mean, running_var, eps, momentum, scale);
    ctx->save_for_backward({q, k, v, a});
    ctx->saved_data["attention_scale"] = attention_scale;
    return mixed_attention_apply(mix, offset, a, v);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto inputs = ctx->get_saved_variables();
    const torch::Tensor &q = inputs[0], &k = inputs[1], &v = inputs[2], &a = inputs[3];
    const MixedApplyGrads m =
        mixed_attention_apply_backward(ctx->saved_data["mix"].toTensor(), ctx->saved_data["offset"].toTensor(), a, v,
                                       grads[0], 1.0 / static_cast<double>(a.size(2)));
    const ReAttentionGrads g = re_attention_gradients(ctx, a, m.cross, m.dy_sums);
    auto [dq, dk] = attention_probs_backward_mixed(q, k, a, ctx->saved_data["attention_scale"].toDouble(), g.w1, m.dy,
                                                   g.w2, a, g.c);
    variable_list out = with_parameters({dq, dk, m.dv}, g);
    out.emplace_back();  // attention_scale
    return out;
  }
};
}  // namespace

void set_batch_norm_sync(SumAcrossProcesses sum) { batch_norm_sync() = std::move(sum); }

BatchNorm2dImpl::BatchNorm2dImpl(int64_t channels, double eps, double momentum) : eps(eps), momentum(momentum) {
  weight = register_parameter("weight", torch::ones({channels}));
  bias = register_parameter("bias", torch::zeros({channels}));
  running_mean = register_buffer("running_mean", torch::zeros({channels}));
  running_var = register_buffer("running_var", torch::ones({channels}));
  num_batches_tracked = register_buffer("num_batches_tracked", torch::zeros({}, torch::kLong));
}

void BatchNorm2dImpl::track_batch() {
  torch::NoGradGuard no_grad;
  num_batches_tracked += 1;
}

torch::Tensor BatchNorm2dImpl::forward(const torch::Tensor& x) {
  TORCH_CHECK(x.dim() == 4, "BatchNorm2d expects [N, C, H, W], got ", x.sizes());
  if (!is_training()) return torch::batch_norm(x, weight, bias, running_mean, running_var, false, momentum, eps, true);
  track_batch();
  if (batch_norm_sync()) return SyncBatchNormFunction::apply(x, weight, bias, running_mean, running_var, eps, momentum);
  return torch::batch_norm(x, weight, bias, running_mean, running_var, true, momentum, eps, true);
}

// Θ, BatchNorm with running statistics and the scale are affine per head:
// in evaluation they fold into one H×H mixing, one pass over the maps
// instead of four (1.5-1.9x faster re-attention, docs/BENCHMARKS.md). In
// training on the CPU, ReAttentionFunction does the same with the batch
// statistics.
//
// With v, the maps are applied to it as well; on the CPU kernels' path
// (float32) this happens without storing the re-attended maps, in training
// and in evaluation without gradients.
torch::Tensor AttentionImpl::re_attend(const torch::Tensor& a, const torch::Tensor& v, torch::Tensor* packed) {
  const double s = options.reatten_scale;
  const bool kernel =
      cpu_kernels_enabled() && head_mixing_applies(a) && (!v.defined() || attention_kernel_applies(v, v, v));
  auto apply = [&](const torch::Tensor& y) {
    if (!v.defined()) return y;
    return attention_kernel_applies(y, v, v) ? attention_apply(y, v) : torch::matmul(y, v);
  };
  const bool inference_kernel = kernel && v.defined() && !is_training() && !torch::GradMode::is_enabled();
  TORCH_CHECK(!packed || inference_kernel, "re-attention: packed maps come only from the CPU kernel's inference path");
  if (is_training()) {
    if (!kernel) return apply(var_norm(reatten_matrix(a)) * s);
    BatchNorm2dImpl& bn = *var_norm;
    bn.track_batch();
    if (!v.defined())
      return ReAttentionFunction::apply(a, reatten_matrix->weight, reatten_matrix->bias, bn.weight, bn.bias,
                                        bn.running_mean, bn.running_var, bn.eps, bn.momentum, s);
    return ReAttentionApplyFunction::apply(a, v, reatten_matrix->weight, reatten_matrix->bias, bn.weight, bn.bias,
                                           bn.running_mean, bn.running_var, bn.eps, bn.momentum, s)
        .permute({0, 2, 1, 3});
  }
  const int64_t B = a.size(0), H = a.size(1), N = a.size(2);
  const BatchNorm2dImpl& bn = *var_norm;
  const torch::Tensor k = bn.weight * s * (bn.running_var + bn.eps).rsqrt();
  const torch::Tensor w = reatten_matrix->weight.view({H, H}) * k.unsqueeze(1);
  const torch::Tensor c = (reatten_matrix->bias - bn.running_mean) * k + bn.bias * s;
  if (inference_kernel) return mixed_attention_apply(w, c, a, v, packed).permute({0, 2, 1, 3});
  return apply(at::baddbmm(c.view({1, H, 1}).expand({B, H, N * N}), w.expand({B, H, H}), a.reshape({B, H, N * N}))
                   .view({B, H, N, N}));
}

torch::Tensor AttentionImpl::forward(const torch::Tensor& x, torch::Tensor* attn) {
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2), H = options.num_heads;
  auto qkv_ = qkv(x).reshape({B, N, 3, H, C / H}).permute({2, 0, 3, 1, 4});
  torch::Tensor q = qkv_[0], k = qkv_[1], v = qkv_[2];
  torch::Tensor out;
  const double scale = 1.0 / std::sqrt(static_cast<double>(C / H));
  const bool kernel = attention_kernel_applies(q, k, v);
#if TORCH_VERSION_MAJOR >= 2
  // LibTorch's fused kernel (flash / memory-efficient) when no map is asked
  // for. On LibTorch 2.15's CPU build vitlab's kernel is 1.12-1.29x faster
  // as an op, but whole ViT steps only 1.01x, and in training it keeps the
  // probabilities SDPA does not (vit_small at batch 32: 3.1 against 2.7 GB
  // peak); docs/BENCHMARKS.md, "Why each kernel exists".
  if (attn == nullptr && !options.re_attention) {
    out = at::scaled_dot_product_attention(q, k, v, {}, is_training() ? options.attn_drop : 0.0);
  }
#endif
  if (kernel && options.re_attention && is_training() && !attn && options.attn_drop == 0.0) {
    // Neither the re-attended maps nor the gradient of the softmax maps are
    // ever stored (docs/BENCHMARKS.md).
    BatchNorm2dImpl& bn = *var_norm;
    bn.track_batch();
    out = FusedReAttentionFunction::apply(q, k, v, reatten_matrix->weight, reatten_matrix->bias, bn.weight, bn.bias,
                                          bn.running_mean, bn.running_var, bn.eps, bn.momentum, options.reatten_scale,
                                          scale)
              .permute({0, 2, 1, 3});
  }
  // Inference on the CPU kernel: the maps that multiply v are written out
  // only when captured, and then packed (capture_packed).
  const bool inference = kernel && !is_training() && !torch::GradMode::is_enabled();
  const bool pack = capture_packed && N >= kPackedWidth && !(capture_softmax && options.re_attention);
  torch::Tensor* packed = inference && attn && pack ? attn : nullptr;
  if (!out.defined() && inference && !options.re_attention && (!attn || packed))
    out = attention_inference(q, k, v, scale, packed);
  if (!out.defined()) {
    torch::Tensor a = kernel ? attention_probs(q, k, scale) : torch::matmul(q * scale, k.transpose(-2, -1)).softmax(-1);
    a = attn_drop(a);
    if (attn && capture_softmax) *attn = a;
    const bool keep_applied = attn && !capture_softmax && !packed;
    if (options.re_attention && !keep_applied) {
      out = re_attend(a, v, packed);  // the re-attended maps are not asked for, or packed: never stored whole
    } else {
      if (options.re_attention) a = re_attend(a);
      if (keep_applied) *attn = a;
      out = kernel ? attention_apply(a, v) : torch::matmul(a, v);
    }
  }
  return proj_drop(proj(out.transpose(1, 2).reshape({B, N, C})));
}

}  // namespace vitlab
