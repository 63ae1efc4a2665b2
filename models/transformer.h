#pragma once
// The Transformer of Vaswani et al. (2017): a post-norm encoder–decoder.
// `Transformer` is the stack alone with torch.nn.Transformer's parameter
// names and sequence-first layout [S, B, E], so its state_dict loads as is;
// `Seq2SeqTransformer` adds token embeddings scaled by √d_model, sinusoidal
// positions, the output projection (optionally tied to the target embedding)
// and greedy decoding.
//
// Not torch::nn::Transformer: LibTorch's C++ layers (1.13 and 2.15) have no
// layer_norm_eps option (their LayerNorms are fixed at 1e-5), which
// torch.nn.Transformer models set; the parameter names here are the same.
#include <torch/torch.h>

#include <string>

namespace vitlab {

struct TransformerOptions {
  int64_t d_model = 512;
  int64_t nhead = 8;
  int64_t num_encoder_layers = 6;
  int64_t num_decoder_layers = 6;
  int64_t dim_feedforward = 2048;
  double dropout = 0.1;
  std::string activation = "relu";  // relu | gelu
  double layer_norm_eps = 1e-5;
  // Seq2SeqTransformer only.
  int64_t src_vocab_size = 37000;
  int64_t tgt_vocab_size = 37000;
  bool tie_weights = true;  // output projection shares the target embedding
  int64_t pad_id = 0;

  template <class F>
  void visit(F&& f) {
    f("d_model", d_model);
    f("nhead", nhead);
    f("num_encoder_layers", num_encoder_layers);
    f("num_decoder_layers", num_decoder_layers);
    f("dim_feedforward", dim_feedforward);
    f("dropout", dropout);
    f("activation", activation);
    f("layer_norm_eps", layer_norm_eps);
    f("src_vocab_size", src_vocab_size);
    f("tgt_vocab_size", tgt_vocab_size);
    f("tie_weights", tie_weights);
    f("pad_id", pad_id);
  }
  void validate() const;
};

// Scaled dot-product multi-head attention with torch.nn.MultiheadAttention's
// parameters (in_proj_weight, in_proj_bias, out_proj) and layout [L, B, E].
class MultiheadAttentionImpl : public torch::nn::Module {
 public:
  MultiheadAttentionImpl(int64_t embed_dim, int64_t num_heads, double dropout);
  // attn_mask [L, S]: bool (true = masked) or float (added to the scores);
  // key_padding_mask [B, S]: true marks padding.
  torch::Tensor forward(const torch::Tensor& query, const torch::Tensor& key, const torch::Tensor& value,
                        const torch::Tensor& attn_mask = {}, const torch::Tensor& key_padding_mask = {});
  int64_t num_heads;
  torch::Tensor in_proj_weight, in_proj_bias;
  torch::nn::Linear out_proj{nullptr};
  torch::nn::Dropout dropout{nullptr};
};
TORCH_MODULE(MultiheadAttention);

class TransformerEncoderLayerImpl : public torch::nn::Module {
 public:
  explicit TransformerEncoderLayerImpl(const TransformerOptions& o);
  torch::Tensor forward(torch::Tensor src, const torch::Tensor& mask = {}, const torch::Tensor& key_padding_mask = {});
  torch::Tensor feed_forward(const torch::Tensor& x);
  MultiheadAttention self_attn{nullptr};
  torch::nn::Linear linear1{nullptr}, linear2{nullptr};
  torch::nn::LayerNorm norm1{nullptr}, norm2{nullptr};
  torch::nn::Dropout dropout{nullptr}, dropout1{nullptr}, dropout2{nullptr};
  bool gelu;
};
TORCH_MODULE(TransformerEncoderLayer);

class TransformerDecoderLayerImpl : public torch::nn::Module {
 public:
  explicit TransformerDecoderLayerImpl(const TransformerOptions& o);
  torch::Tensor forward(torch::Tensor tgt, const torch::Tensor& memory, const torch::Tensor& tgt_mask = {},
                        const torch::Tensor& memory_mask = {}, const torch::Tensor& tgt_key_padding_mask = {},
                        const torch::Tensor& memory_key_padding_mask = {});
  MultiheadAttention self_attn{nullptr}, multihead_attn{nullptr};
  torch::nn::Linear linear1{nullptr}, linear2{nullptr};
  torch::nn::LayerNorm norm1{nullptr}, norm2{nullptr}, norm3{nullptr};
  torch::nn::Dropout dropout{nullptr}, dropout1{nullptr}, dropout2{nullptr}, dropout3{nullptr};
  bool gelu;
};
TORCH_MODULE(TransformerDecoderLayer);

// The torch.nn.Transformer stack: `encoder.layers.{i}`, `encoder.norm`,
// `decoder.layers.{i}`, `decoder.norm`.
class TransformerImpl : public torch::nn::Module {
 public:
  explicit TransformerImpl(const TransformerOptions& o);
  torch::Tensor encode(const torch::Tensor& src, const torch::Tensor& src_mask = {},
                       const torch::Tensor& src_key_padding_mask = {});
  torch::Tensor decode(const torch::Tensor& tgt, const torch::Tensor& memory, const torch::Tensor& tgt_mask = {},
                       const torch::Tensor& tgt_key_padding_mask = {},
                       const torch::Tensor& memory_key_padding_mask = {});
  // src [S, B, E], tgt [T, B, E] -> [T, B, E].
  torch::Tensor forward(const torch::Tensor& src, const torch::Tensor& tgt, const torch::Tensor& src_mask = {},
                        const torch::Tensor& tgt_mask = {}, const torch::Tensor& src_key_padding_mask = {},
                        const torch::Tensor& tgt_key_padding_mask = {});

  std::shared_ptr<torch::nn::Module> encoder, decoder;
  std::vector<TransformerEncoderLayer> encoder_layers;
  std::vector<TransformerDecoderLayer> decoder_layers;
  torch::nn::LayerNorm encoder_norm{nullptr}, decoder_norm{nullptr};
};
TORCH_MODULE(Transformer);

// Float mask [n, n] with -inf above the diagonal (torch's
// generate_square_subsequent_mask).
torch::Tensor causal_mask(int64_t n, const torch::Device& device = torch::kCPU);

// Sinusoidal positional encoding [n, d_model] (Vaswani et al. §3.5).
torch::Tensor sinusoidal_positions(int64_t n, int64_t d_model, const torch::Device& device = torch::kCPU);

class Seq2SeqTransformerImpl : public torch::nn::Module {
 public:
  explicit Seq2SeqTransformerImpl(const TransformerOptions& o);
  // Token ids src [B, S], tgt [B, T] -> logits [B, T, tgt_vocab]. Padding
  // (pad_id) is masked out of attention; the decoder sees only the past.
  torch::Tensor forward(const torch::Tensor& src, const torch::Tensor& tgt);
  // Greedy decoding: starts from bos, stops at eos or max_len tokens; [B, <= max_len + 1].
  torch::Tensor greedy_decode(const torch::Tensor& src, int64_t bos_id, int64_t eos_id, int64_t max_len);

  const TransformerOptions& options() const { return options_; }

  torch::nn::Embedding src_embed{nullptr}, tgt_embed{nullptr};
  Transformer transformer{nullptr};
  torch::nn::Dropout pos_drop{nullptr};
  // Untied: `generator` (Linear). Tied: the target embedding's weight and
  // `generator_bias`.
  torch::nn::Linear generator{nullptr};
  torch::Tensor generator_bias;

 private:
  torch::Tensor embed(torch::nn::Embedding& table, const torch::Tensor& ids);
  torch::Tensor project(const torch::Tensor& decoded);
  TransformerOptions options_;
};
TORCH_MODULE(Seq2SeqTransformer);

}  // namespace vitlab
