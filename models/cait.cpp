#include "models/cait.h"

#include <cmath>

#include "common/error.h"

namespace vitlab {

void CaitOptions::validate() const {
  if (!init_values || !std::isfinite(*init_values) || *init_values == 0.0)
    fail("model.init_values must be a finite nonzero number for CaiT (its blocks all have LayerScale), got {}",
         init_values ? fmt::format("{}", *init_values) : "null");
  ViTOptions::validate();
  if (depth_token_only < 1)
    fail("model.depth_token_only must be >= 1 (the class token reads the patches only there), got {}",
         depth_token_only);
  if (!(mlp_ratio_token_only > 0)) fail("model.mlp_ratio_token_only must be > 0, got {}", mlp_ratio_token_only);
}

ClassAttentionImpl::ClassAttentionImpl(const AttentionOptions& o) : options(o) {
  TORCH_CHECK(o.dim % o.num_heads == 0, "embed_dim ", o.dim, " is not divisible by num_heads ", o.num_heads);
  auto linear = [&](const char* name, bool bias) {
    return register_module(name, torch::nn::Linear(torch::nn::LinearOptions(o.dim, o.dim).bias(bias)));
  };
  q = linear("q", o.qkv_bias);
  k = linear("k", o.qkv_bias);
  v = linear("v", o.qkv_bias);
  attn_drop = register_module("attn_drop", torch::nn::Dropout(o.attn_drop));
  proj = linear("proj", true);
  proj_drop = register_module("proj_drop", torch::nn::Dropout(o.proj_drop));
}

torch::Tensor ClassAttentionImpl::forward(const torch::Tensor& x, AttentionMapSink* maps) {
  const int64_t B = x.size(0), C = x.size(2), H = options.num_heads;
  auto heads = [&](const torch::Tensor& t) { return t.reshape({B, -1, H, C / H}).permute({0, 2, 1, 3}); };
  const torch::Tensor query = heads(q(x.narrow(1, 0, 1))) * (1.0 / std::sqrt(static_cast<double>(C / H)));
  // One query row per head: the explicit product costs N per head, so no
  // fused path is needed.
  const torch::Tensor a = attn_drop(torch::matmul(query, heads(k(x)).transpose(-2, -1)).softmax(-1));
  if (maps) maps->put(a);
  return proj_drop(proj(torch::matmul(a, heads(v(x))).transpose(1, 2).reshape({B, 1, C})));
}

ClassAttentionBlockImpl::ClassAttentionBlockImpl(const AttentionOptions& attention, double mlp_ratio,
                                                 double init_values) {
  const int64_t dim = attention.dim;
  norm1 = register_module("norm1", layer_norm(dim));
  attn = register_module("attn", ClassAttention(attention));
  norm2 = register_module("norm2", layer_norm(dim));
  mlp = register_module("mlp", Mlp(dim, static_cast<int64_t>(dim * mlp_ratio), attention.proj_drop));
  gamma_1 = register_parameter("gamma_1", torch::full({dim}, init_values));
  gamma_2 = register_parameter("gamma_2", torch::full({dim}, init_values));
}

torch::Tensor ClassAttentionBlockImpl::forward(const torch::Tensor& x, const torch::Tensor& cls,
                                               AttentionMapSink* maps) {
  // timm gives these blocks no stochastic depth.
  const torch::Tensor updated = cls + gamma_1 * attn(norm1(torch::cat({cls, x}, 1)), maps);
  return updated + gamma_2 * mlp(norm2(updated));
}

namespace {

// Validates first: the base constructor's arguments are evaluated in no set
// order. timm's CaiT gives every self-attention block the same drop-path
// rate, not ViT's linear rule.
std::vector<BlockOptions> cait_block_options(const CaitOptions& o) {
  o.validate();
  std::vector<BlockOptions> blocks = vit_block_options(o);
  for (auto& b : blocks) {
    b.talking_heads = true;
    b.cait_names = true;
    b.drop_path = o.drop_path_rate;
  }
  return blocks;
}

}  // namespace

CaitImpl::CaitImpl(const CaitOptions& o)
    : VisionTransformerImpl(o, cait_block_options(o),
                            torch::nn::AnyModule(PatchEmbed(o.img_size, o.patch_size, o.in_chans, o.embed_dim)),
                            /*late_class_token=*/true),
      options_(o) {
  // timm passes these blocks neither dropout rate.
  AttentionOptions attention;
  attention.dim = o.embed_dim;
  attention.num_heads = o.num_heads;
  attention.qkv_bias = o.qkv_bias;
  blocks_token_only_list = register_module("blocks_token_only", torch::nn::ModuleList());
  for (int64_t i = 0; i < o.depth_token_only; ++i) {
    blocks_token_only.push_back(ClassAttentionBlock(attention, o.mlp_ratio_token_only, *o.init_values));
    blocks_token_only_list->push_back(blocks_token_only.back());
  }
  init_linear_layers(*blocks_token_only_list);
}

torch::Tensor CaitImpl::forward_features(torch::Tensor x, AttentionMapSink* maps,
                                         std::vector<torch::Tensor>* block_outputs) {
  return forward_features(std::move(x), maps, block_outputs, nullptr);
}

torch::Tensor CaitImpl::forward_features(torch::Tensor x, AttentionMapSink* maps,
                                         std::vector<torch::Tensor>* block_outputs, AttentionMapSink* class_maps) {
  x = forward_blocks(std::move(x), maps, block_outputs);
  torch::Tensor cls = cls_token.expand({x.size(0), -1, -1});
  for (auto& block : blocks_token_only) cls = block(x, cls, class_maps);
  return norm(torch::cat({cls, x}, 1));
}

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> CaitImpl::forward_with_class_attention(const torch::Tensor& x) {
  AttentionMaps maps, class_maps;
  torch::Tensor logits = forward_head(forward_features(x, &maps, nullptr, &class_maps));
  return {logits, torch::stack(maps.blocks), torch::stack(class_maps.blocks)};
}

}  // namespace vitlab
