#include "models/re_attention.h"

#include <ATen/record_function.h>

#include "kernels/attention.h"
#include "kernels/head_mixing.h"

namespace vitlab {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Re-attention in training, s · BatchNorm(Θ a + b) over the maps a
// [B, H, N, N], without storing Θ a. With ã = a - 1/N (centred for softmax
// maps, so one-pass moments lose no precision), every term is affine in ã:
// the batch statistics follow from Σ ã ãᵀ and Σ ã (one pass), the output is
// one H×H mixing of a (one pass), and the backward needs Σ dy ãᵀ and Σ dy
// (one pass) and one mixing of dy and a for the gradient of a. Statistics
// are synchronised across processes as BatchNorm2d's.
//
// ReAttentionApplyFunction goes on to apply the re-attended maps to v
// ([B, N, H, d], as attention_apply before its permute) without ever
// storing them (mixed_attention_apply): its backward recomputes them.
// FusedReAttentionFunction starts from q and k: the gradient of the softmax
// maps is never stored either.

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

torch::Tensor re_attention_training(const torch::Tensor& a, const ReAttentionParameters& p) {
  BatchNorm2dImpl& bn = p.norm;
  bn.track_batch();
  return ReAttentionFunction::apply(a, p.theta, p.theta_bias, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                                    bn.eps, bn.momentum, p.scale);
}

torch::Tensor re_attention_apply_training(const torch::Tensor& a, const torch::Tensor& v,
                                          const ReAttentionParameters& p) {
  BatchNorm2dImpl& bn = p.norm;
  bn.track_batch();
  return ReAttentionApplyFunction::apply(a, v, p.theta, p.theta_bias, bn.weight, bn.bias, bn.running_mean,
                                         bn.running_var, bn.eps, bn.momentum, p.scale)
      .permute({0, 2, 1, 3});
}

torch::Tensor fused_re_attention_training(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                          double attention_scale, const ReAttentionParameters& p) {
  BatchNorm2dImpl& bn = p.norm;
  bn.track_batch();
  return FusedReAttentionFunction::apply(q, k, v, p.theta, p.theta_bias, bn.weight, bn.bias, bn.running_mean,
                                         bn.running_var, bn.eps, bn.momentum, p.scale, attention_scale)
      .permute({0, 2, 1, 3});
}

}  // namespace vitlab
