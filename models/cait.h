#pragma once
// CaiT (Touvron et al. 2021, "Going deeper with Image Transformers") as
// timm's Cait (timm/models/cait.py), with its parameter names: the patch
// tokens alone go through `depth` LayerScale blocks with talking-heads
// attention (`blocks.N.attn.proj_l`, `proj_w`, `blocks.N.gamma_1`,
// `gamma_2`); then `depth_token_only` class-attention blocks
// (`blocks_token_only.N`, `attn.q/k/v`) in which only the class token is
// updated, attending to itself and the patches; then `norm` and `head` on
// the class token.
//
// A VisionTransformer whose class token joins after the blocks: the
// self-attention maps [L, B, H, N, N] of N patch tokens (no prefix token) are
// what forward_with_attention returns and what the analysis measures;
// forward_with_class_attention adds the class-attention maps.
#include <tuple>

#include "models/vit.h"

namespace vitlab {

// The keys timm's Cait takes (its drop_rate covers the position, projection
// and head dropout, as ViTOptions' does). class_token, global_pool, skip and
// mlp are not CaiT keys: it always has a class token, pooled by the head.
struct CaitOptions : ViTOptions {
  int64_t depth_token_only = 2;
  double mlp_ratio_token_only = 4.0;

  CaitOptions() { init_values = 1e-4; }  // timm's default; every CaiT block has LayerScale

  template <class F>
  void visit(F&& f) {
    visit_shared(f);
    f("depth_token_only", depth_token_only);
    f("mlp_ratio_token_only", mlp_ratio_token_only);
  }
  void validate() const;
};

// timm's ClassAttn: the class token (first of x) queries every token,
// itself included, through separate q, k and v projections.
class ClassAttentionImpl : public torch::nn::Module {
 public:
  explicit ClassAttentionImpl(const AttentionOptions& options);
  // x [B, 1 + N, C], class token first: the class token's update [B, 1, C].
  // maps: when not null, is handed the softmax maps [B, H, 1, 1 + N].
  torch::Tensor forward(const torch::Tensor& x, AttentionMapSink* maps = nullptr);

  AttentionOptions options;
  torch::nn::Linear q{nullptr}, k{nullptr}, v{nullptr}, proj{nullptr};
  torch::nn::Dropout attn_drop{nullptr}, proj_drop{nullptr};
};
TORCH_MODULE(ClassAttention);

// timm's LayerScaleBlockClassAttn: a pre-norm LayerScale block whose
// attention and MLP update the class token alone.
class ClassAttentionBlockImpl : public torch::nn::Module {
 public:
  ClassAttentionBlockImpl(const AttentionOptions& attention, double mlp_ratio, double init_values);
  // x [B, N, D] the patch tokens, cls [B, 1, D]: the new class token.
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& cls, AttentionMapSink* maps = nullptr);

  torch::nn::LayerNorm norm1{nullptr}, norm2{nullptr};
  ClassAttention attn{nullptr};
  Mlp mlp{nullptr};
  torch::Tensor gamma_1, gamma_2;
};
TORCH_MODULE(ClassAttentionBlock);

class CaitImpl : public VisionTransformerImpl {
 public:
  explicit CaitImpl(const CaitOptions& options);

  // maps and block_outputs: of the self-attention blocks ([B, H, N, N] and
  // [B, N, D]); the result is norm([class token, patch tokens]).
  torch::Tensor forward_features(torch::Tensor x, AttentionMapSink* maps = nullptr,
                                 std::vector<torch::Tensor>* block_outputs = nullptr) override;
  // The same, with class_maps handed each class-attention block's maps.
  torch::Tensor forward_features(torch::Tensor x, AttentionMapSink* maps, std::vector<torch::Tensor>* block_outputs,
                                 AttentionMapSink* class_maps);
  // Logits, the self-attention maps [depth, B, H, N, N] (after proj_w: the
  // maps that multiply V) and the class-attention maps
  // [depth_token_only, B, H, 1, 1 + N] (class token first among the keys).
  std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> forward_with_class_attention(const torch::Tensor& x);

  const CaitOptions& cait_options() const { return options_; }

  torch::nn::ModuleList blocks_token_only_list{nullptr};
  std::vector<ClassAttentionBlock> blocks_token_only;

 private:
  CaitOptions options_;
};
TORCH_MODULE(Cait);

}  // namespace vitlab
