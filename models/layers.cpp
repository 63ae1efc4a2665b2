#include "models/layers.h"

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

void init_linear_layers(torch::nn::Module& module) {
  torch::NoGradGuard no_grad;
  module.apply([](torch::nn::Module& m) {
    if (auto* linear = m.as<torch::nn::Linear>()) {
      trunc_normal_(linear->weight, 0.02);
      if (linear->bias.defined()) linear->bias.zero_();
    }
  });
}

torch::nn::LayerNorm layer_norm(int64_t dim) {
  return torch::nn::LayerNorm(torch::nn::LayerNormOptions({dim}).eps(1e-6));
}

LayerScaleImpl::LayerScaleImpl(int64_t dim, double init_values)
    : gamma(register_parameter("gamma", torch::full({dim}, init_values))) {}

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

namespace {

SumAcrossProcesses& batch_norm_sum() {
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

}  // namespace

void set_batch_norm_sync(SumAcrossProcesses sum) { batch_norm_sum() = std::move(sum); }

const SumAcrossProcesses& batch_norm_sync() { return batch_norm_sum(); }

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

}  // namespace vitlab
