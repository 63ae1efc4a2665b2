#pragma once
// Building blocks shared by the vision transformers, named as in timm so that
// state_dict keys match (`attn.qkv`, `mlp.fc1`, `patch_embed.proj`, ...).
#include <torch/torch.h>

#include <functional>
#include <vector>

namespace vitlab {

// timm's trunc_normal_: N(mean, std) truncated to [a, b] (absolute bounds).
void trunc_normal_(torch::Tensor tensor, double std = 0.02, double mean = 0.0, double a = -2.0, double b = 2.0);

// timm's weight init of its vision transformers for every Linear in module:
// trunc_normal(.02) weights, zero biases.
void init_linear_layers(torch::nn::Module& module);

// The LayerNorm of timm's vision transformers (eps 1e-6).
torch::nn::LayerNorm layer_norm(int64_t dim);

// Stochastic depth: drops the whole residual branch per sample in training.
class DropPathImpl : public torch::nn::Module {
 public:
  explicit DropPathImpl(double p = 0.0) : p(p) {}
  torch::Tensor forward(const torch::Tensor& x);
  double p;
};
TORCH_MODULE(DropPath);

// timm's LayerScale (Touvron et al. 2021): the learnable per-channel gamma,
// initialised to init_values, that a residual branch is multiplied by. Only
// its parameter: the block multiplies (models/vit.h), as CaiT's blocks
// multiply by theirs, which are not in a submodule.
class LayerScaleImpl : public torch::nn::Module {
 public:
  LayerScaleImpl(int64_t dim, double init_values);
  torch::Tensor gamma;
};
TORCH_MODULE(LayerScale);

class MlpImpl : public torch::nn::Module {
 public:
  MlpImpl(int64_t dim, int64_t hidden, double drop);
  torch::Tensor forward(const torch::Tensor& x);
  torch::nn::Linear fc1{nullptr}, fc2{nullptr};
  torch::nn::Dropout drop{nullptr};
};
TORCH_MODULE(Mlp);

// Non-overlapping patches as one strided convolution: [B,C,H,W] -> [B,N,D].
class PatchEmbedImpl : public torch::nn::Module {
 public:
  PatchEmbedImpl(int64_t img_size, int64_t patch_size, int64_t in_chans, int64_t embed_dim);
  torch::Tensor forward(const torch::Tensor& x);
  torch::nn::Conv2d proj{nullptr};
  int64_t img_size;
};
TORCH_MODULE(PatchEmbed);

// torch.nn.BatchNorm2d (the same parameters, buffers and names, eps 1e-5,
// momentum 0.1) whose training-mode statistics can be taken over every
// process of a data-parallel run, as torch.nn.SyncBatchNorm does, once
// set_batch_norm_sync() has been given a way to sum across processes.
class BatchNorm2dImpl : public torch::nn::Module {
 public:
  explicit BatchNorm2dImpl(int64_t channels, double eps = 1e-5, double momentum = 0.1);
  torch::Tensor forward(const torch::Tensor& x);
  // Counts a training batch, for code that normalises with these
  // parameters without calling forward (re-attention's fused path).
  void track_batch();

  double eps, momentum;
  torch::Tensor weight, bias, running_mean, running_var, num_batches_tracked;
};
TORCH_MODULE(BatchNorm2d);

// Sums tensors in place across the processes of a data-parallel run.
using SumAcrossProcesses = std::function<void(std::vector<torch::Tensor>&)>;
// Every BatchNorm2d in training mode synchronises its statistics through
// `sum` until reset with an empty function (the default: per process).
void set_batch_norm_sync(SumAcrossProcesses sum);
// The function set there (empty: per process), for code that computes batch
// statistics itself (re-attention's fused path).
const SumAcrossProcesses& batch_norm_sync();

}  // namespace vitlab
