#include "models/transformer.h"

#include <cmath>

#include "common/error.h"

namespace vitlab {

void TransformerOptions::validate() const {
  for (auto [key, v] : {std::pair{"d_model", d_model},
                        {"nhead", nhead},
                        {"num_encoder_layers", num_encoder_layers},
                        {"num_decoder_layers", num_decoder_layers},
                        {"dim_feedforward", dim_feedforward},
                        {"src_vocab_size", src_vocab_size},
                        {"tgt_vocab_size", tgt_vocab_size}})
    if (v < 1) fail("model.{} must be >= 1, got {}", key, v);
  if (d_model % nhead != 0) fail("model.d_model {} is not divisible by model.nhead {}", d_model, nhead);
  if (!(dropout >= 0.0 && dropout < 1.0)) fail("model.dropout must be in [0, 1), got {}", dropout);
  if (activation != "relu" && activation != "gelu")
    fail("model.activation must be 'relu' or 'gelu', got '{}'", activation);
  if (!(layer_norm_eps > 0)) fail("model.layer_norm_eps must be > 0, got {}", layer_norm_eps);
  if (pad_id < 0 || pad_id >= std::min(src_vocab_size, tgt_vocab_size))
    fail("model.pad_id {} is not a token id of both vocabularies", pad_id);
}

MultiheadAttentionImpl::MultiheadAttentionImpl(int64_t embed_dim, int64_t num_heads, double p) : num_heads(num_heads) {
  in_proj_weight = register_parameter("in_proj_weight", torch::empty({3 * embed_dim, embed_dim}));
  in_proj_bias = register_parameter("in_proj_bias", torch::zeros({3 * embed_dim}));
  out_proj = register_module("out_proj", torch::nn::Linear(embed_dim, embed_dim));
  dropout = register_module("dropout", torch::nn::Dropout(p));
  torch::NoGradGuard no_grad;
  torch::nn::init::xavier_uniform_(in_proj_weight);
  out_proj->bias.zero_();
}

torch::Tensor MultiheadAttentionImpl::forward(const torch::Tensor& query, const torch::Tensor& key,
                                              const torch::Tensor& value, const torch::Tensor& attn_mask,
                                              const torch::Tensor& key_padding_mask) {
  namespace F = torch::nn::functional;
  const int64_t L = query.size(0), B = query.size(1), E = query.size(2), S = key.size(0), H = num_heads;
  auto w = in_proj_weight.chunk(3, 0);
  auto b = in_proj_bias.chunk(3, 0);
  auto heads = [&](const torch::Tensor& t, int64_t n) { return t.reshape({n, B, H, E / H}).permute({1, 2, 0, 3}); };
  torch::Tensor q = heads(F::linear(query, w[0], b[0]), L);
  torch::Tensor k = heads(F::linear(key, w[1], b[1]), S);
  torch::Tensor v = heads(F::linear(value, w[2], b[2]), S);
  torch::Tensor scores = torch::matmul(q / std::sqrt(static_cast<double>(E / H)), k.transpose(-2, -1));  // [B,H,L,S]
  if (attn_mask.defined()) {
    TORCH_CHECK(attn_mask.dim() == 2 && attn_mask.size(0) == L && attn_mask.size(1) == S, "attn_mask must be [", L,
                ", ", S, "], got ", attn_mask.sizes());
    scores = attn_mask.scalar_type() == torch::kBool ? scores.masked_fill(attn_mask, -INFINITY) : scores + attn_mask;
  }
  if (key_padding_mask.defined()) {
    TORCH_CHECK(key_padding_mask.dim() == 2 && key_padding_mask.size(0) == B && key_padding_mask.size(1) == S,
                "key_padding_mask must be [", B, ", ", S, "], got ", key_padding_mask.sizes());
    scores = scores.masked_fill(key_padding_mask.to(torch::kBool).view({B, 1, 1, S}), -INFINITY);
  }
  torch::Tensor out = torch::matmul(dropout(scores.softmax(-1)), v);  // [B,H,L,d]
  return out_proj(out.permute({2, 0, 1, 3}).reshape({L, B, E}));
}

namespace {
torch::nn::LayerNorm layer_norm(const TransformerOptions& o) {
  return torch::nn::LayerNorm(torch::nn::LayerNormOptions({o.d_model}).eps(o.layer_norm_eps));
}
torch::Tensor activate(const torch::Tensor& x, bool gelu) { return gelu ? torch::gelu(x) : torch::relu(x); }
}  // namespace

TransformerEncoderLayerImpl::TransformerEncoderLayerImpl(const TransformerOptions& o) : gelu(o.activation == "gelu") {
  self_attn = register_module("self_attn", MultiheadAttention(o.d_model, o.nhead, o.dropout));
  linear1 = register_module("linear1", torch::nn::Linear(o.d_model, o.dim_feedforward));
  dropout = register_module("dropout", torch::nn::Dropout(o.dropout));
  linear2 = register_module("linear2", torch::nn::Linear(o.dim_feedforward, o.d_model));
  norm1 = register_module("norm1", layer_norm(o));
  norm2 = register_module("norm2", layer_norm(o));
  dropout1 = register_module("dropout1", torch::nn::Dropout(o.dropout));
  dropout2 = register_module("dropout2", torch::nn::Dropout(o.dropout));
}

torch::Tensor TransformerEncoderLayerImpl::forward(torch::Tensor x, const torch::Tensor& mask,
                                                   const torch::Tensor& key_padding_mask) {
  x = norm1(x + dropout1(self_attn(x, x, x, mask, key_padding_mask)));
  return norm2(x + dropout2(linear2(dropout(activate(linear1(x), gelu)))));
}

TransformerDecoderLayerImpl::TransformerDecoderLayerImpl(const TransformerOptions& o) : gelu(o.activation == "gelu") {
  self_attn = register_module("self_attn", MultiheadAttention(o.d_model, o.nhead, o.dropout));
  multihead_attn = register_module("multihead_attn", MultiheadAttention(o.d_model, o.nhead, o.dropout));
  linear1 = register_module("linear1", torch::nn::Linear(o.d_model, o.dim_feedforward));
  dropout = register_module("dropout", torch::nn::Dropout(o.dropout));
  linear2 = register_module("linear2", torch::nn::Linear(o.dim_feedforward, o.d_model));
  norm1 = register_module("norm1", layer_norm(o));
  norm2 = register_module("norm2", layer_norm(o));
  norm3 = register_module("norm3", layer_norm(o));
  dropout1 = register_module("dropout1", torch::nn::Dropout(o.dropout));
  dropout2 = register_module("dropout2", torch::nn::Dropout(o.dropout));
  dropout3 = register_module("dropout3", torch::nn::Dropout(o.dropout));
}

torch::Tensor TransformerDecoderLayerImpl::forward(torch::Tensor x, const torch::Tensor& memory,
                                                   const torch::Tensor& tgt_mask, const torch::Tensor& memory_mask,
                                                   const torch::Tensor& tgt_key_padding_mask,
                                                   const torch::Tensor& memory_key_padding_mask) {
  x = norm1(x + dropout1(self_attn(x, x, x, tgt_mask, tgt_key_padding_mask)));
  x = norm2(x + dropout2(multihead_attn(x, memory, memory, memory_mask, memory_key_padding_mask)));
  return norm3(x + dropout3(linear2(dropout(activate(linear1(x), gelu)))));
}

TransformerImpl::TransformerImpl(const TransformerOptions& o) {
  o.validate();
  encoder = register_module("encoder", std::make_shared<torch::nn::Module>());
  decoder = register_module("decoder", std::make_shared<torch::nn::Module>());
  auto enc_layers = encoder->register_module("layers", torch::nn::ModuleList());
  auto dec_layers = decoder->register_module("layers", torch::nn::ModuleList());
  for (int64_t i = 0; i < o.num_encoder_layers; ++i) {
    encoder_layers.push_back(TransformerEncoderLayer(o));
    enc_layers->push_back(encoder_layers.back());
  }
  for (int64_t i = 0; i < o.num_decoder_layers; ++i) {
    decoder_layers.push_back(TransformerDecoderLayer(o));
    dec_layers->push_back(decoder_layers.back());
  }
  encoder_norm = encoder->register_module("norm", layer_norm(o));
  decoder_norm = decoder->register_module("norm", layer_norm(o));
}

torch::Tensor TransformerImpl::encode(const torch::Tensor& src, const torch::Tensor& src_mask,
                                      const torch::Tensor& src_key_padding_mask) {
  torch::Tensor x = src;
  for (auto& layer : encoder_layers) x = layer(x, src_mask, src_key_padding_mask);
  return encoder_norm(x);
}

torch::Tensor TransformerImpl::decode(const torch::Tensor& tgt, const torch::Tensor& memory,
                                      const torch::Tensor& tgt_mask, const torch::Tensor& tgt_key_padding_mask,
                                      const torch::Tensor& memory_key_padding_mask) {
  torch::Tensor x = tgt;
  for (auto& layer : decoder_layers)
    x = layer->forward(x, memory, tgt_mask, {}, tgt_key_padding_mask, memory_key_padding_mask);
  return decoder_norm(x);
}

torch::Tensor TransformerImpl::forward(const torch::Tensor& src, const torch::Tensor& tgt,
                                       const torch::Tensor& src_mask, const torch::Tensor& tgt_mask,
                                       const torch::Tensor& src_key_padding_mask,
                                       const torch::Tensor& tgt_key_padding_mask) {
  TORCH_CHECK(src.dim() == 3 && tgt.dim() == 3 && src.size(1) == tgt.size(1) && src.size(2) == tgt.size(2),
              "expected src [S, B, E] and tgt [T, B, E] with the same B and E, got ", src.sizes(), " and ",
              tgt.sizes());
  torch::Tensor memory = encode(src, src_mask, src_key_padding_mask);
  return decode(tgt, memory, tgt_mask, tgt_key_padding_mask, src_key_padding_mask);
}

torch::Tensor causal_mask(int64_t n, const torch::Device& device) {
  return torch::full({n, n}, -INFINITY, torch::TensorOptions().device(device)).triu(1);
}

torch::Tensor sinusoidal_positions(int64_t n, int64_t d_model, const torch::Device& device) {
  auto opts = torch::TensorOptions().device(device);
  torch::Tensor pos = torch::arange(n, opts).unsqueeze(1);
  torch::Tensor div = torch::exp(torch::arange(0, d_model, 2, opts) * (-std::log(10000.0) / d_model));
  torch::Tensor pe = torch::zeros({n, d_model}, opts);
  pe.index_put_({torch::indexing::Slice(), torch::indexing::Slice(0, torch::indexing::None, 2)}, torch::sin(pos * div));
  pe.index_put_({torch::indexing::Slice(), torch::indexing::Slice(1, torch::indexing::None, 2)},
                torch::cos(pos * div).narrow(1, 0, d_model / 2));
  return pe;
}

Seq2SeqTransformerImpl::Seq2SeqTransformerImpl(const TransformerOptions& o) : options_(o) {
  o.validate();
  src_embed = register_module("src_embed", torch::nn::Embedding(o.src_vocab_size, o.d_model));
  tgt_embed = register_module("tgt_embed", torch::nn::Embedding(o.tgt_vocab_size, o.d_model));
  transformer = register_module("transformer", Transformer(o));
  pos_drop = register_module("pos_drop", torch::nn::Dropout(o.dropout));
  if (o.tie_weights)
    generator_bias = register_parameter("generator_bias", torch::zeros({o.tgt_vocab_size}));
  else
    generator = register_module("generator", torch::nn::Linear(o.d_model, o.tgt_vocab_size));
  // Xavier for every matrix, as torch.nn.Transformer and the reference code do;
  // embeddings at std d_model^-1/2 so that the √d_model scaling gives unit scale.
  torch::NoGradGuard no_grad;
  for (auto& p : parameters())
    if (p.dim() > 1) torch::nn::init::xavier_uniform_(p);
  src_embed->weight.normal_(0.0, 1.0 / std::sqrt(static_cast<double>(o.d_model)));
  tgt_embed->weight.normal_(0.0, 1.0 / std::sqrt(static_cast<double>(o.d_model)));
}

torch::Tensor Seq2SeqTransformerImpl::embed(torch::nn::Embedding& table, const torch::Tensor& ids) {
  TORCH_CHECK(ids.dim() == 2, "expected token ids [B, S], got shape ", ids.sizes());
  torch::Tensor x = table(ids) * std::sqrt(static_cast<double>(options_.d_model));
  x = x + sinusoidal_positions(ids.size(1), options_.d_model, ids.device());
  return pos_drop(x).transpose(0, 1);  // [S, B, E]
}

torch::Tensor Seq2SeqTransformerImpl::project(const torch::Tensor& decoded) {
  torch::Tensor h = decoded.transpose(0, 1);
  return generator ? generator(h) : torch::nn::functional::linear(h, tgt_embed->weight, generator_bias);
}

torch::Tensor Seq2SeqTransformerImpl::forward(const torch::Tensor& src, const torch::Tensor& tgt) {
  torch::Tensor src_pad = src.eq(options_.pad_id), tgt_pad = tgt.eq(options_.pad_id);
  torch::Tensor memory = transformer->encode(embed(src_embed, src), {}, src_pad);
  return project(
      transformer->decode(embed(tgt_embed, tgt), memory, causal_mask(tgt.size(1), tgt.device()), tgt_pad, src_pad));
}

torch::Tensor Seq2SeqTransformerImpl::greedy_decode(const torch::Tensor& src, int64_t bos_id, int64_t eos_id,
                                                    int64_t max_len) {
  torch::NoGradGuard no_grad;
  torch::Tensor src_pad = src.eq(options_.pad_id);
  torch::Tensor memory = transformer->encode(embed(src_embed, src), {}, src_pad);
  torch::Tensor out = torch::full({src.size(0), 1}, bos_id, src.options());
  torch::Tensor done = torch::zeros({src.size(0)}, src.options().dtype(torch::kBool));
  for (int64_t step = 0; step < max_len; ++step) {
    torch::Tensor h =
        transformer->decode(embed(tgt_embed, out), memory, causal_mask(out.size(1), src.device()), {}, src_pad);
    torch::Tensor next = project(h).select(1, -1).argmax(-1);
    next = next.masked_fill(done, options_.pad_id);
    out = torch::cat({out, next.unsqueeze(1)}, 1);
    done = done.logical_or(next.eq(eos_id));
    if (done.all().item<bool>()) break;
  }
  return out;
}

}  // namespace vitlab
