#include "models/vit.h"

#include <cmath>

#include "common/config.h"
#include "common/error.h"

namespace vitlab {

void ViTOptions::validate() const {
  auto positive = [](const char* key, int64_t v) {
    if (v < 1) fail("model.{} must be >= 1, got {}", key, v);
  };
  positive("img_size", img_size);
  positive("patch_size", patch_size);
  positive("in_chans", in_chans);
  positive("embed_dim", embed_dim);
  positive("depth", depth);
  positive("num_heads", num_heads);
  if (num_classes < 0) fail("model.num_classes must be >= 0 (0: no head), got {}", num_classes);
  if (img_size % patch_size != 0)
    fail("model.img_size {} is not divisible by model.patch_size {}", img_size, patch_size);
  if (embed_dim % num_heads != 0)
    fail("model.embed_dim {} is not divisible by model.num_heads {}", embed_dim, num_heads);
  if (!(mlp_ratio > 0)) fail("model.mlp_ratio must be > 0, got {}", mlp_ratio);
  if (global_pool != "token" && global_pool != "avg")
    fail("model.global_pool must be 'token' or 'avg', got '{}'", global_pool);
  if (global_pool == "token" && !class_token) fail("model.global_pool 'token' needs model.class_token: true");
  for (auto [key, p] :
       {std::pair{"drop_rate", drop_rate}, {"attn_drop_rate", attn_drop_rate}, {"drop_path_rate", drop_path_rate}})
    if (!(p >= 0.0 && p < 1.0)) fail("model.{} must be in [0, 1), got {}", key, p);
  // timm takes a falsy init_values (0 as None) for no LayerScale; a gamma of
  // zeros would be the other reading, so 0 is refused rather than guessed.
  if (init_values && !(std::isfinite(*init_values) && *init_values != 0.0))
    fail("model.init_values must be a finite nonzero number or null (no LayerScale), got {}", *init_values);
  // Stochastic depth drops a residual branch; without the skip it would
  // zero the sample's tokens instead.
  if (!skip && drop_path_rate > 0.0)
    fail("model.drop_path_rate must be 0 with model.skip: false (no residual branch to drop), got {}", drop_path_rate);
}

std::vector<BlockOptions> vit_block_options(const ViTOptions& o) {
  std::vector<BlockOptions> blocks;
  for (int64_t i = 0; i < o.depth; ++i) {
    BlockOptions b;
    b.attention.dim = o.embed_dim;
    b.attention.num_heads = o.num_heads;
    b.attention.qkv_bias = o.qkv_bias;
    b.attention.attn_drop = o.attn_drop_rate;
    b.attention.proj_drop = o.drop_rate;
    b.mlp_ratio = o.mlp_ratio;
    b.drop_path = o.depth > 1 ? o.drop_path_rate * static_cast<double>(i) / static_cast<double>(o.depth - 1) : 0.0;
    b.init_values = o.init_values;
    b.skip = o.skip;
    b.mlp = o.mlp;
    blocks.push_back(b);
  }
  return blocks;
}

BlockImpl::BlockImpl(const BlockOptions& o) : options(o) {
  const int64_t dim = o.attention.dim;
  norm1 = register_module("norm1", layer_norm(dim));
  std::shared_ptr<AttentionImpl> attention;
  if (o.re_attention)
    attention = std::make_shared<ReAttentionImpl>(o.attention, o.reatten_scale);
  else if (o.talking_heads)
    attention = std::make_shared<TalkingHeadAttentionImpl>(o.attention);
  else
    attention = std::make_shared<AttentionImpl>(o.attention);
  attn = register_module("attn", Attention(attention));
  drop_path = register_module("drop_path", DropPath(o.drop_path));
  if (o.mlp) {
    norm2 = register_module("norm2", layer_norm(dim));
    mlp = register_module("mlp", Mlp(dim, static_cast<int64_t>(dim * o.mlp_ratio), o.attention.proj_drop));
  }
  if (!o.init_values) return;
  if (o.cait_names) {
    gamma_1 = register_parameter("gamma_1", torch::full({dim}, *o.init_values));
    if (o.mlp) gamma_2 = register_parameter("gamma_2", torch::full({dim}, *o.init_values));
  } else {
    ls1 = register_module("ls1", LayerScale(dim, *o.init_values));
    gamma_1 = ls1->gamma;
    if (o.mlp) {
      ls2 = register_module("ls2", LayerScale(dim, *o.init_values));
      gamma_2 = ls2->gamma;
    }
  }
}

torch::Tensor BlockImpl::residual(const torch::Tensor& x, const torch::Tensor& branch, const torch::Tensor& gamma) {
  torch::Tensor y = gamma.defined() ? branch * gamma : branch;
  if (options.scale_adjustment != 1.0) y = y / options.scale_adjustment;
  y = drop_path(y);
  return options.skip ? x + y : y;
}

torch::Tensor BlockImpl::forward(torch::Tensor x, AttentionMapSink* maps) {
  const double s = options.scale_adjustment;
  x = residual(x, attn(norm1(s == 1.0 ? x : x * s), maps), gamma_1);
  if (!mlp) return x;
  return residual(x, mlp(norm2(s == 1.0 ? x : x * s)), gamma_2);
}

torch::Tensor resample_pos_embed(const torch::Tensor& pos_embed, int64_t new_grid, int64_t num_prefix_tokens) {
  const int64_t n = pos_embed.size(1) - num_prefix_tokens;
  const auto old_grid = static_cast<int64_t>(std::lround(std::sqrt(static_cast<double>(n))));
  if (old_grid * old_grid != n)
    fail("pos_embed has {} patch positions, not a square grid: cannot resample it to {}x{}", n, new_grid, new_grid);
  if (old_grid == new_grid) return pos_embed;
  namespace F = torch::nn::functional;
  const auto dtype = pos_embed.scalar_type();
  torch::Tensor prefix = pos_embed.narrow(1, 0, num_prefix_tokens);
  torch::Tensor grid = pos_embed.narrow(1, num_prefix_tokens, n).to(torch::kFloat);
  const int64_t D = pos_embed.size(2);
  grid = grid.reshape({1, old_grid, old_grid, D}).permute({0, 3, 1, 2});
  grid = F::interpolate(grid, F::InterpolateFuncOptions()
                                  .size(std::vector<int64_t>{new_grid, new_grid})
                                  .mode(torch::kBicubic)
                                  .align_corners(false)
                                  .antialias(true));
  grid = grid.permute({0, 2, 3, 1}).reshape({1, new_grid * new_grid, D}).to(dtype);
  return torch::cat({prefix, grid}, 1);
}

VisionTransformerImpl::VisionTransformerImpl(const ViTOptions& o)
    : VisionTransformerImpl(o, vit_block_options(o),
                            torch::nn::AnyModule(PatchEmbed(o.img_size, o.patch_size, o.in_chans, o.embed_dim))) {
  torch::NoGradGuard no_grad;
  if (cls_token.defined()) cls_token.normal_(0.0, 1e-6);  // timm's init
}

VisionTransformerImpl::VisionTransformerImpl(const ViTOptions& o, const std::vector<BlockOptions>& block_options,
                                             torch::nn::AnyModule stem, bool late_class_token)
    : patch_embed(std::move(stem)), options_(o), prefix_tokens_(o.class_token && !late_class_token ? 1 : 0) {
  o.validate();
  register_module("patch_embed", patch_embed.ptr());
  const int64_t num_patches = o.grid_size() * o.grid_size();
  if (o.class_token) cls_token = register_parameter("cls_token", torch::zeros({1, 1, o.embed_dim}));
  pos_embed = register_parameter("pos_embed", torch::zeros({1, num_patches + prefix_tokens_, o.embed_dim}));
  pos_drop = register_module("pos_drop", torch::nn::Dropout(o.drop_rate));
  blocks_list = register_module("blocks", torch::nn::ModuleList());
  for (const auto& b : block_options) {
    blocks.push_back(Block(b));
    blocks_list->push_back(blocks.back());
  }
  norm = register_module(o.global_pool == "avg" ? "fc_norm" : "norm", layer_norm(o.embed_dim));
  head_drop = register_module("head_drop", torch::nn::Dropout(o.drop_rate));
  if (o.num_classes > 0) head = register_module("head", torch::nn::Linear(o.embed_dim, o.num_classes));

  // timm's init: trunc_normal(.02) for Linear weights and pos_embed, zero
  // Linear biases; convolutions, norms and LayerScale keep their own.
  torch::NoGradGuard no_grad;
  trunc_normal_(pos_embed, 0.02);
  if (cls_token.defined()) trunc_normal_(cls_token, 0.02);
  init_linear_layers(*this);
}

torch::Tensor VisionTransformerImpl::forward_blocks(torch::Tensor x, AttentionMapSink* maps,
                                                    std::vector<torch::Tensor>* block_outputs) {
  TORCH_CHECK(x.dim() == 4, "expected an image batch [B, C, H, W], got shape ", x.sizes());
  TORCH_CHECK(x.size(1) == options_.in_chans, "input has ", x.size(1), " channels, the model expects ",
              options_.in_chans, " (model.in_chans)");
  x = patch_embed.forward(x);
  if (prefix_tokens_ > 0) x = torch::cat({cls_token.expand({x.size(0), -1, -1}), x}, 1);
  x = pos_drop(x + pos_embed);
  for (auto& block : blocks) {
    x = block(x, maps);
    if (block_outputs) block_outputs->push_back(x);
  }
  return x;
}

torch::Tensor VisionTransformerImpl::forward_features(torch::Tensor x, AttentionMapSink* maps,
                                                      std::vector<torch::Tensor>* block_outputs) {
  x = forward_blocks(x, maps, block_outputs);
  return options_.global_pool == "avg" ? x : norm(x);
}

torch::Tensor VisionTransformerImpl::forward_head(const torch::Tensor& x) {
  torch::Tensor pooled = options_.global_pool == "avg"
                             ? norm(x.narrow(1, num_prefix_tokens(), x.size(1) - num_prefix_tokens()).mean(1))
                             : x.select(1, 0);
  pooled = head_drop(pooled);
  return head ? head(pooled) : pooled;
}

torch::Tensor VisionTransformerImpl::forward(const torch::Tensor& x) { return forward_head(forward_features(x)); }

std::pair<torch::Tensor, torch::Tensor> VisionTransformerImpl::forward_with_attention(const torch::Tensor& x) {
  AttentionMaps maps;
  torch::Tensor logits = forward_head(forward_features(x, &maps));
  return {logits, torch::stack(maps.blocks)};
}

void VisionTransformerImpl::adapt_state(StateDict& state) const {
  auto it = state.find("pos_embed");
  if (it == state.end() || it->second.sizes() == pos_embed.sizes()) return;
  if (it->second.dim() != 3 || it->second.size(2) != pos_embed.size(2)) return;  // reported as a mismatch
  it->second = resample_pos_embed(it->second, options_.grid_size(), num_prefix_tokens());
}

}  // namespace vitlab
