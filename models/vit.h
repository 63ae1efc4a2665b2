#pragma once
// Vision Transformer (Dosovitskiy et al. 2021) as timm defines it: parameter
// names, initialisation and outputs match timm's VisionTransformer.
#include <torch/torch.h>

#include <string>
#include <vector>

#include "io/state_dict.h"
#include "models/attention.h"
#include "models/layers.h"

namespace vitlab {

struct ViTOptions {
  int64_t img_size = 224;
  int64_t patch_size = 16;
  int64_t in_chans = 3;
  int64_t num_classes = 1000;
  int64_t embed_dim = 768;
  int64_t depth = 12;
  int64_t num_heads = 12;
  double mlp_ratio = 4.0;
  bool qkv_bias = true;
  bool class_token = true;
  std::string global_pool = "token";  // token | avg
  double drop_rate = 0.0;
  double attn_drop_rate = 0.0;
  double drop_path_rate = 0.0;

  template <class F>
  void visit(F&& f) {
    f("img_size", img_size);
    f("patch_size", patch_size);
    f("in_chans", in_chans);
    f("num_classes", num_classes);
    f("embed_dim", embed_dim);
    f("depth", depth);
    f("num_heads", num_heads);
    f("mlp_ratio", mlp_ratio);
    f("qkv_bias", qkv_bias);
    f("class_token", class_token);
    f("global_pool", global_pool);
    f("drop_rate", drop_rate);
    f("attn_drop_rate", attn_drop_rate);
    f("drop_path_rate", drop_path_rate);
  }
  // Errors name the key (model.KEY) and the expectation.
  void validate() const;
  int64_t grid_size() const { return img_size / patch_size; }
};

struct BlockOptions {
  AttentionOptions attention;  // its dim and proj_drop are the block's too
  // DeepViT: ReAttention instead of Attention (the official
  // apply_transform), its maps scaled by reatten_scale.
  bool re_attention = false;
  double reatten_scale = 1.0;
  double mlp_ratio = 4.0;
  double drop_path = 0.0;
  // DeepViT's residual scaling s: x + attn(norm1(x*s))/s, x + mlp(norm2(x*s))/s,
  // which is the plain pre-norm block when s = 1.
  double scale_adjustment = 1.0;
};

class BlockImpl : public torch::nn::Module {
 public:
  explicit BlockImpl(const BlockOptions& options);
  // maps: when not null, is handed the block's attention maps.
  torch::Tensor forward(torch::Tensor x, AttentionMapSink* maps = nullptr);

  BlockOptions options;
  torch::nn::LayerNorm norm1{nullptr}, norm2{nullptr};
  Attention attn{nullptr};  // an Attention or a ReAttention
  DropPath drop_path{nullptr};
  Mlp mlp{nullptr};
};
TORCH_MODULE(Block);

// Resamples a [1, prefix + g*g, D] position embedding to a new_grid × new_grid
// grid (bicubic with antialiasing, prefix tokens kept apart), as timm's
// resample_abs_pos_embed does when loading weights at another image size.
torch::Tensor resample_pos_embed(const torch::Tensor& pos_embed, int64_t new_grid, int64_t num_prefix_tokens);

class VisionTransformerImpl : public torch::nn::Module {
 public:
  explicit VisionTransformerImpl(const ViTOptions& options);

  torch::Tensor forward(const torch::Tensor& x);
  // maps: when not null, is handed each block's attention maps in turn
  // (AttentionMaps collects them as [B, H, T, T]); block_outputs: receives
  // each block's output tokens ([B, T, D], before the final norm).
  torch::Tensor forward_features(torch::Tensor x, AttentionMapSink* maps = nullptr,
                                 std::vector<torch::Tensor>* block_outputs = nullptr);
  torch::Tensor forward_head(const torch::Tensor& features);
  // Logits and the stacked maps [L, B, H, T, T].
  std::pair<torch::Tensor, torch::Tensor> forward_with_attention(const torch::Tensor& x);

  // Adapts weights trained with another configuration before loading: a
  // pos_embed for another image size is resampled.
  void adapt_state(StateDict& state) const;

  const ViTOptions& vit_options() const { return options_; }
  int64_t num_prefix_tokens() const { return options_.class_token ? 1 : 0; }

  torch::nn::AnyModule patch_embed;
  torch::Tensor cls_token, pos_embed;
  torch::nn::Dropout pos_drop{nullptr};
  torch::nn::ModuleList blocks_list{nullptr};
  std::vector<Block> blocks;
  torch::nn::LayerNorm norm{nullptr};  // `norm` with token pooling, `fc_norm` with avg (timm)
  torch::nn::Dropout head_drop{nullptr};
  torch::nn::Linear head{nullptr};

 protected:
  // For ViT variants (DeepViT): per-block settings and the patch stem differ,
  // everything else is shared.
  VisionTransformerImpl(const ViTOptions& options, const std::vector<BlockOptions>& block_options,
                        torch::nn::AnyModule stem);

 private:
  ViTOptions options_;
};
TORCH_MODULE(VisionTransformer);

// The per-block options of a plain ViT, with the linear stochastic-depth rule.
std::vector<BlockOptions> vit_block_options(const ViTOptions& options);

}  // namespace vitlab
