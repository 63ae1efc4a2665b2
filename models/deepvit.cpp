#include "models/deepvit.h"

#include <cmath>

#include "common/error.h"

namespace vitlab {

void DeepViTOptions::validate() const {
  ViTOptions::validate();
  if (static_cast<int64_t>(apply_transform.size()) != depth)
    fail("model.apply_transform has {} entries but model.depth is {}: give one boolean per block",
         apply_transform.size(), depth);
  if (!(scale_adjustment > 0)) fail("model.scale_adjustment must be > 0, got {}", scale_adjustment);
  if (use_cnn_embed && (patch_size < 2 || patch_size % 2 != 0 || img_size % patch_size != 0))
    fail("model.use_cnn_embed needs an even model.patch_size (the stem halves the image first), got {}", patch_size);
}

PatchEmbedCNNImpl::PatchEmbedCNNImpl(int64_t img_size, int64_t patch_size, int64_t in_chans, int64_t embed_dim)
    : img_size(img_size) {
  using torch::nn::Conv2dOptions;
  conv1 = register_module("conv1", torch::nn::Conv2d(Conv2dOptions(in_chans, 64, 7).stride(2).padding(3).bias(false)));
  bn1 = register_module("bn1", BatchNorm2d(64));
  conv2 = register_module("conv2", torch::nn::Conv2d(Conv2dOptions(64, 64, 3).stride(1).padding(1).bias(false)));
  bn2 = register_module("bn2", BatchNorm2d(64));
  proj =
      register_module("proj", torch::nn::Conv2d(Conv2dOptions(64, embed_dim, patch_size / 2).stride(patch_size / 2)));
}

torch::Tensor PatchEmbedCNNImpl::forward(const torch::Tensor& x) {
  TORCH_CHECK(x.size(2) == img_size && x.size(3) == img_size, "input image is ", x.size(2), "x", x.size(3),
              ", the model expects ", img_size, "x", img_size, " (model.img_size)");
  torch::Tensor y = torch::relu(bn1(conv1(x)));
  y = torch::relu(bn2(conv2(y)));
  return proj(y).flatten(2).transpose(1, 2);
}

namespace {

// Both validate first: the base constructor's arguments are evaluated in no
// set order.
std::vector<BlockOptions> deepvit_block_options(const DeepViTOptions& o) {
  o.validate();
  std::vector<BlockOptions> blocks = vit_block_options(o);
  const double head_scale = 1.0 / std::sqrt(static_cast<double>(o.embed_dim / o.num_heads));
  for (size_t i = 0; i < blocks.size(); ++i) {
    blocks[i].re_attention = o.apply_transform[i];
    blocks[i].reatten_scale = o.transform_scale ? head_scale : 1.0;
    blocks[i].scale_adjustment = o.scale_adjustment;
  }
  return blocks;
}

torch::nn::AnyModule deepvit_stem(const DeepViTOptions& o) {
  o.validate();
  if (o.use_cnn_embed) return torch::nn::AnyModule(PatchEmbedCNN(o.img_size, o.patch_size, o.in_chans, o.embed_dim));
  return torch::nn::AnyModule(PatchEmbed(o.img_size, o.patch_size, o.in_chans, o.embed_dim));
}

}  // namespace

DeepViTImpl::DeepViTImpl(const DeepViTOptions& o)
    : VisionTransformerImpl(o, deepvit_block_options(o), deepvit_stem(o)), options_(o) {}

}  // namespace vitlab
