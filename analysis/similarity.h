#pragma once
// Attention collapse as the DeepViT paper (Zhou et al. 2021, §3) measures it:
// the cross-layer similarity of attention maps, accumulated over a stream of
// batches with memory independent of the number of images. Definitions and
// choices are in docs/ANALYSIS.md.
#include <torch/torch.h>

#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace vitlab {

struct SimilarityOptions {
  // An (image, head, token) entry counts as similar in ratio[p, q] when its
  // per-image cosine is >= tau.
  double tau = 0.9;
  // Block k (k >= 1) is a similar block when S[k-1, k] >= similar_threshold.
  double similar_threshold = 0.9;
  // Images per batched matrix product; 0: as many as keep the chunk's
  // scratch memory (kept for reuse between batches) under chunk_bytes.
  int64_t chunk = 0;
  // 0: 256 MiB on the CPU, 2 GiB on a GPU, where larger products (fewer
  // launches and syncs) made the analysis 3-4x faster on an H100.
  int64_t chunk_bytes = 0;
  // Columns are divided by max(||column||, eps), as torch.nn.functional.normalize:
  // an all-zero column has cosine 0 with everything, itself included.
  double eps = 1e-8;
  // Subtract each row's mean first (1/T for a softmax map), so that only how
  // the maps deviate from uniform attention counts: uniform maps, which
  // every pair of softmax maps partly shares, no longer make columns alike.
  // Off: the paper's measure.
  bool center = false;

  void validate() const;  // errors name the option and the expectation
};

struct SimilarityResult {
  int64_t images = 0;
  int64_t layers = 0, heads = 0, tokens = 0;
  SimilarityOptions options;
  // All tensors on the CPU. M is float32, the summaries float64.
  torch::Tensor M;                    // [L, L, H, T]: mean over images of cos(A^p_{h,:,t}, A^q_{h,:,t})
  torch::Tensor S;                    // [L, L]: mean of M over heads and tokens
  torch::Tensor adjacent;             // [L-1]: S[k-1, k] for k = 1..L-1
  torch::Tensor ratio;                // [L, L]: share of (image, head, token) entries with cosine >= tau
  int64_t similar_blocks = 0;         // blocks k >= 1 with S[k-1, k] >= similar_threshold
  double similar_blocks_ratio = 0.0;  // similar_blocks / L
  torch::Tensor inter_head;       // [L, H, H]: cos between heads g, h of the same column, mean over tokens and images
  torch::Tensor inter_head_mean;  // [L]: mean of inter_head's off-diagonal entries (NaN with one head)
  torch::Tensor feature_similarity;  // [L, L]: token-wise cosine of block outputs; undefined without features
  // [L, H]: mean over images and rows of Σ_t A[i, t]², of the maps as
  // analysed (centred with options.center). For softmax maps it lies in
  // [1/T, 1]: 1/T for uniform attention, 1 when every row attends to one
  // token; its reciprocal is the effective number of tokens a row attends to.
  torch::Tensor row_square_norm;
  // [N, L-1] float64: per image, S[k-1, k] of that image alone (its mean
  // over heads and tokens), for bootstrap intervals over images
  // (analysis/bootstrap.h).
  torch::Tensor image_adjacent;

  // Everything but M, as nested lists; parameters included.
  nlohmann::json to_json() const;
};

// Streams batches of attention maps (and optionally block outputs) into
// O(L²·H·T) accumulators on `device`. Sums are float32 over the images of a
// batch and float64 across batches, so the result does not depend on how
// the images were split into batches (to ~1e-7). Not thread-safe.
class SimilarityAccumulator {
 public:
  SimilarityAccumulator(int64_t layers, int64_t heads, int64_t tokens, SimilarityOptions options = {},
                        torch::Device device = torch::kCPU);

  // attn: [L, B, H, T, T] (the map that multiplies V; rows are output tokens);
  // features: [L, B, T, D] block outputs, or undefined. Any float dtype and
  // device; the work happens on the accumulator's device. Either give
  // features with every batch or with none.
  void add(const torch::Tensor& attn, const torch::Tensor& features = {});
  // The same with one tensor per block ([B, H, T, T] and [B, T, D]), as
  // VisionTransformerImpl::forward_features collects them (no stacked copy).
  void add(const std::vector<torch::Tensor>& attn, const std::vector<torch::Tensor>& features = {});

  int64_t images() const { return images_; }
  // An error when no image was added.
  SimilarityResult result() const;

 private:
  int64_t chunk_images(int64_t feature_dim) const;
  void add_maps_chunk(const std::vector<torch::Tensor>& attn, int64_t b0, int64_t n, torch::Tensor& image_adjacent,
                      torch::Tensor& m_sum, torch::Tensor& above_tau, torch::Tensor& head_sum,
                      torch::Tensor& square_sum);

  int64_t L_, H_, T_;
  SimilarityOptions options_;
  torch::Device device_;
  int64_t images_ = 0;
  int64_t feature_images_ = 0;
  torch::Tensor m_sum_;        // float64 [L, L, H, T]: sum over images of the per-image cosines
  torch::Tensor kernel_sum_;   // float64: the CPU kernel's part of m_sum_, in its layout (see add_maps_cpu)
  torch::Tensor above_tau_;    // int64 [L, L]: entries with cosine >= tau
  torch::Tensor head_sum_;     // float64 [L, H, H]: sum over images and tokens
  torch::Tensor square_sum_;   // float64 [L, H]: sum over images of the maps' squared Frobenius norms
  torch::Tensor feature_sum_;  // float64 [L, L]: sum over images and tokens
  int64_t feature_tokens_ = 0;
  std::vector<torch::Tensor> image_adjacent_;  // per batch, [B, L-1] float64
  // Scratch memory reused from chunk to chunk: fresh allocations of this
  // size cost more in page faults than the matrix products themselves.
  torch::Tensor batch_sum_, columns_, gram_, mask_, normalised_features_;
};

// Attention rollout (Abnar & Zuidema 2020) with the options of its common
// implementation (jacobgil/vit-explain).
struct RolloutOptions {
  std::string head_fusion = "mean";  // mean | max | min over a block's heads
  // The lowest fraction of each fused map's entries set to 0 before the
  // identity is added (the entry [0, 0] kept, as the reference code does).
  double discard_ratio = 0.0;

  void validate() const;  // errors name the option and the expectation
};

// A block's maps [B, H, ...] with the heads fused into one: [B, 1, ...].
torch::Tensor fuse_heads(const torch::Tensor& maps, const std::string& head_fusion);

// The rollout of per-block maps [B, H, T, T]: per block the heads fused,
// negative entries clamped to 0 (re-attention maps may have them), the
// lowest discard_ratio of entries dropped, plus the identity, rows
// renormalised to sum 1; then the product over blocks, last block leftmost.
// Returns [B, T, T]: row i says how much each input token flows into output
// token i.
torch::Tensor attention_rollout(const std::vector<torch::Tensor>& attn, const RolloutOptions& options = {});

}  // namespace vitlab
