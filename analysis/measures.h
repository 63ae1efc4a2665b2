#pragma once
// The attention-collapse measures the field uses beside DeepViT's
// cross-layer similarity, streamed over images with float64 accumulation;
// docs/ANALYSIS.md gives each formula and its source:
//   entropy         [L, H]  mean over images and query rows of -Σ_j A_ij ln A_ij
//   distance        [L, H]  mean attention distance in pixels over patch tokens
//                           (Dosovitskiy et al. 2021, Fig. 7)
//   uniformity      [L]     mean |cos| between distinct patch tokens of a block's
//                           output (Gong et al. 2021)
//   residual        [L]     ‖X - 1 x̄ᵀ‖_F / ‖X‖_F of a block's output X [T, D]
//                           (Dong et al. 2021: 0 when every token is the same)
//   effective_rank  [L]     exp(entropy of X's normalised singular values)
//                           (Roy & Vetterli 2007)
//   cka             [L, L]  linear minibatch CKA of block outputs with the
//                           unbiased HSIC (Nguyen, Raghu & Kornblith 2021)
// Attention measures take softmax maps; the rest take block outputs.
#include <torch/torch.h>

#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace vitlab {

// Every measure's name, as --measures takes them.
const std::vector<std::string>& measure_names();

struct MeasureOptions {
  std::vector<std::string> measures = measure_names();
  int64_t prefix_tokens = 1;  // class/distillation/register tokens, before the patch tokens
  int64_t patch_size = 16;    // pixels per patch side (the attention distance's unit)
  int64_t cka_batch = 64;     // images per CKA minibatch, in input order; a last one of < 4 is dropped

  void validate() const;  // errors name the option and the expectation
  bool has(const std::string& name) const;
};

struct MeasureResult {
  int64_t images = 0;
  // Undefined where not measured; float64.
  torch::Tensor entropy, distance, uniformity, residual, effective_rank, cka;
  // The block-output measures per image, [N, L] (for bootstrap intervals
  // over images, analysis/bootstrap.h); undefined where not measured.
  torch::Tensor image_uniformity, image_residual, image_effective_rank;
  // summary.json's keys: attention_entropy, mean_attention_distance,
  // token_uniformity, rank_residual, effective_rank, cka.
  nlohmann::json to_json() const;
};

class MeasureAccumulator {
 public:
  // layers blocks, each with heads heads, over tokens tokens (prefix included).
  MeasureAccumulator(int64_t layers, int64_t heads, int64_t tokens, MeasureOptions options);

  bool needs_maps() const;
  bool needs_features() const;
  // One batch's softmax maps of block l, [B, H, T, T].
  void add_maps(int64_t l, const torch::Tensor& maps);
  // The same one map at a time, for a sink that is handed them from cache:
  // begin_maps, then map() for every (image b, head h) of the batch, from
  // any threads (each pair once), then end_maps. map: T x T, row-major.
  void begin_maps(int64_t l, int64_t B);
  void map(int64_t b, int64_t h, const float* data);
  void end_maps();
  // One batch's block outputs, one [B, T, D] tensor per block.
  void add_features(const std::vector<torch::Tensor>& features);
  // Ends a batch of n images (after its add_maps and add_features).
  void end_batch(int64_t n);
  MeasureResult result() const;

 private:
  // The HSIC matrix [L, L] of one CKA minibatch (n >= 4 images).
  torch::Tensor minibatch_hsic(const std::vector<torch::Tensor>& pending) const;

  int64_t L_, H_, T_;
  MeasureOptions options_;
  int64_t images_ = 0;
  torch::Tensor entropy_, distance_;  // sums, float64
  // Per batch, [B, L] float64: the block-output measures of each image.
  std::vector<torch::Tensor> uniformity_, residual_, effective_rank_;
  torch::Tensor pixel_distance_;  // [n, n] between patch tokens, float32
  // The block whose maps come one at a time, and their statistics [B, H, 2].
  int64_t streaming_ = -1;
  torch::Tensor map_stats_;
  torch::Tensor hsic_;  // Σ over minibatches, [L, L]
  int64_t minibatches_ = 0;
  std::vector<torch::Tensor> pending_;  // per block, the flattened outputs [m, T·D] of the open minibatch
};

}  // namespace vitlab
