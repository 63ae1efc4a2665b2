#pragma once
// Vision Transformer (Dosovitskiy et al. 2021) as timm defines it: parameter
// names, initialisation and outputs match timm's VisionTransformer.
#include <torch/torch.h>

#include <optional>
#include <string>
#include <vector>

#include "common/config.h"
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
  // LayerScale: each residual branch times a learnable per-channel gamma
  // initialised to this (`blocks.N.ls1.gamma`, `ls2.gamma`); null: none.
  OptionalDouble init_values;
  // The positive control of Dong et al. (2021): false removes the blocks'
  // residual connections (skip) or their MLP and norm2 (mlp). Pure attention
  // loses rank doubly exponentially with depth; the skips prevent it.
  bool skip = true;
  bool mlp = true;

  template <class F>
  void visit(F&& f) {
    visit_shared(f);
    f("class_token", class_token);
    f("global_pool", global_pool);
    f("skip", skip);
    f("mlp", mlp);
  }
  // The keys the ViT variants with other token layouts (CaiT) share.
  template <class F>
  void visit_shared(F&& f) {
    f("img_size", img_size);
    f("patch_size", patch_size);
    f("in_chans", in_chans);
    f("num_classes", num_classes);
    f("embed_dim", embed_dim);
    f("depth", depth);
    f("num_heads", num_heads);
    f("mlp_ratio", mlp_ratio);
    f("qkv_bias", qkv_bias);
    f("drop_rate", drop_rate);
    f("attn_drop_rate", attn_drop_rate);
    f("drop_path_rate", drop_path_rate);
    f("init_values", init_values);
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
  // CaiT: TalkingHeadAttention instead of Attention.
  bool talking_heads = false;
  double mlp_ratio = 4.0;
  double drop_path = 0.0;
  // DeepViT's residual scaling s: x + attn(norm1(x*s))/s, x + mlp(norm2(x*s))/s,
  // which is the plain pre-norm block when s = 1.
  double scale_adjustment = 1.0;
  // LayerScale's initial gamma (none when unset), registered as timm's ViT
  // names it (`ls1.gamma`, `ls2.gamma`) or, with cait_names, as CaiT does
  // (`gamma_1`, `gamma_2`).
  std::optional<double> init_values;
  bool cait_names = false;
  // Residual connections, and the MLP half of the block (ViTOptions).
  bool skip = true;
  bool mlp = true;
};

class BlockImpl : public torch::nn::Module {
 public:
  explicit BlockImpl(const BlockOptions& options);
  // maps: when not null, is handed the block's attention maps.
  torch::Tensor forward(torch::Tensor x, AttentionMapSink* maps = nullptr);

  BlockOptions options;
  torch::nn::LayerNorm norm1{nullptr}, norm2{nullptr};  // norm2 and mlp: null without the MLP
  // An Attention, a ReAttention or a TalkingHeadAttention.
  Attention attn{nullptr};
  DropPath drop_path{nullptr};
  Mlp mlp{nullptr};
  // LayerScale's gammas (undefined without): the parameters of `ls1` and
  // `ls2`, or the block's own `gamma_1` and `gamma_2`.
  LayerScale ls1{nullptr}, ls2{nullptr};
  torch::Tensor gamma_1, gamma_2;

 private:
  // x + drop_path(gamma * branch / s), without x when the block has no skips.
  torch::Tensor residual(const torch::Tensor& x, const torch::Tensor& branch, const torch::Tensor& gamma);
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
  virtual torch::Tensor forward_features(torch::Tensor x, AttentionMapSink* maps = nullptr,
                                         std::vector<torch::Tensor>* block_outputs = nullptr);
  torch::Tensor forward_head(const torch::Tensor& features);
  // Logits and the stacked maps [L, B, H, T, T].
  std::pair<torch::Tensor, torch::Tensor> forward_with_attention(const torch::Tensor& x);

  // Adapts weights trained with another configuration before loading: a
  // pos_embed for another image size is resampled.
  void adapt_state(StateDict& state) const;

  const ViTOptions& vit_options() const { return options_; }
  // Tokens before the patch tokens in the blocks (the class token), which
  // pos_embed has positions for too.
  int64_t num_prefix_tokens() const { return prefix_tokens_; }

  torch::nn::AnyModule patch_embed;
  torch::Tensor cls_token, pos_embed;
  torch::nn::Dropout pos_drop{nullptr};
  torch::nn::ModuleList blocks_list{nullptr};
  std::vector<Block> blocks;
  torch::nn::LayerNorm norm{nullptr};  // `norm` with token pooling, `fc_norm` with avg (timm)
  torch::nn::Dropout head_drop{nullptr};
  torch::nn::Linear head{nullptr};

 protected:
  // For ViT variants: per-block settings and the patch stem differ
  // (DeepViT), and the class token may join only after the blocks
  // (late_class_token, CaiT): pos_embed and the blocks then hold the patch
  // tokens alone.
  VisionTransformerImpl(const ViTOptions& options, const std::vector<BlockOptions>& block_options,
                        torch::nn::AnyModule stem, bool late_class_token = false);
  // The patch tokens, with their positions and the class token when it
  // comes first, through the blocks: [B, T, D], before the final norm.
  torch::Tensor forward_blocks(torch::Tensor x, AttentionMapSink* maps, std::vector<torch::Tensor>* block_outputs);

 private:
  ViTOptions options_;
  int64_t prefix_tokens_;
};
TORCH_MODULE(VisionTransformer);

// The per-block options of a plain ViT, with the linear stochastic-depth rule.
std::vector<BlockOptions> vit_block_options(const ViTOptions& options);

}  // namespace vitlab
