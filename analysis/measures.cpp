#include "analysis/measures.h"

#include <ATen/Parallel.h>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cmath>

#include "common/error.h"
#include "kernels/map_stats.h"

namespace vitlab {

const std::vector<std::string>& measure_names() {
  static const std::vector<std::string> names = {"entropy",  "distance",       "uniformity",
                                                 "residual", "effective_rank", "cka"};
  return names;
}

void MeasureOptions::validate() const {
  for (const auto& m : measures)
    if (std::find(measure_names().begin(), measure_names().end(), m) == measure_names().end())
      fail("analysis measure '{}' is unknown; the measures are {}", m, fmt::join(measure_names(), ", "));
  if (prefix_tokens < 0) fail("--prefix-tokens must be >= 0, got {}", prefix_tokens);
  if (patch_size < 1) fail("--patch-size must be >= 1, got {}", patch_size);
  if (cka_batch < 4) fail("--cka-batch must be >= 4 images (the unbiased HSIC needs 4), got {}", cka_batch);
}

bool MeasureOptions::has(const std::string& name) const {
  return std::find(measures.begin(), measures.end(), name) != measures.end();
}

namespace {

// ‖g_i - g_j‖₂ · patch_size between the n = g² patch tokens' grid positions.
torch::Tensor grid_distances(int64_t n, int64_t patch_size) {
  const auto g = static_cast<int64_t>(std::lround(std::sqrt(static_cast<double>(n))));
  if (g * g != n)
    fail("attention distance: {} patch tokens are not a square grid (check the number of prefix tokens)", n);
  const torch::Tensor index = torch::arange(n, torch::kDouble);
  const torch::Tensor pos = torch::stack({torch::floor(index / g), torch::fmod(index, g)}, 1);  // [n, 2]
  return torch::cdist(pos, pos) * static_cast<double>(patch_size);
}

// The block-output measures: uniformity and effective rank from one float64
// Gram matrix of each image's tokens, the residual from the tokens
// themselves; per image, in float64.

// The Gram matrices of x [B, T, D] in float64, of its tokens (X Xᵀ,
// [B, T, T]) or of its channels (Xᵀ X, [B, D, D]): a float32 Gram matrix's
// rounding (1e-7 of its largest eigenvalue) gives a collapsed block's zero
// singular values a weight of 3e-4 each, which lifts a rank-one block's
// effective rank from 1 to 1.6.
torch::Tensor gram(const torch::Tensor& x64, bool of_tokens) {
  return of_tokens ? torch::matmul(x64, x64.transpose(1, 2)) : torch::matmul(x64.transpose(1, 2), x64);
}

// Per image [B], the mean |cos| between distinct patch tokens, from the
// Gram matrices: cos_ij = G_ij / sqrt(G_ii G_jj) for i, j >= prefix.
torch::Tensor uniformity_per_image(const torch::Tensor& gram, int64_t prefix) {
  const int64_t n = gram.size(1) - prefix;
  if (n < 2) fail("token uniformity needs at least 2 patch tokens, got {}", n);
  const torch::Tensor g = gram.narrow(1, prefix, n).narrow(2, prefix, n);
  const torch::Tensor inv_norm = g.diagonal(0, 1, 2).clamp_min(1e-300).rsqrt();  // [B, n]
  const torch::Tensor cos = (g * inv_norm.unsqueeze(2) * inv_norm.unsqueeze(1)).abs_();
  const torch::Tensor off_diagonal = cos.sum(torch::IntArrayRef{1, 2}) - cos.diagonal(0, 1, 2).sum(1);
  return off_diagonal / static_cast<double>(n * (n - 1));
}

// Per image [B], ‖X - 1 x̄ᵀ‖_F / ‖X‖_F (0 for X = 0), from the tokens:
// through the Gram matrix, ‖X‖² - T‖x̄‖² would cancel to rounding noise
// (1e-8 instead of 0) for a collapsed block.
torch::Tensor residual_per_image(const torch::Tensor& x64) {
  const torch::Tensor total = x64.norm(2, torch::IntArrayRef{1, 2});
  const torch::Tensor centred = (x64 - x64.mean(1, true)).norm(2, torch::IntArrayRef{1, 2});
  return torch::where(total > 0, centred / total, torch::zeros_like(total));
}

// The eigenvalues of each Gram matrix [B, T, T], one matrix per thread:
// LAPACK's syevd runs sequentially at this size, and a batched eigvalsh
// loops over the batch on one thread.
torch::Tensor gram_eigenvalues(const torch::Tensor& gram) {
  torch::Tensor out = torch::empty({gram.size(0), gram.size(1)}, gram.options());
  at::parallel_for(0, gram.size(0), 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) out[b].copy_(torch::linalg_eigvalsh(gram[b]));
  });
  return out;
}

// Per image [B], exp(-Σ p_k ln p_k), p the normalised singular values
// σ_k = sqrt(λ_k(X Xᵀ)) (0 for X = 0).
torch::Tensor effective_rank_per_image(const torch::Tensor& gram) {
  const torch::Tensor sigma = gram_eigenvalues(gram).clamp_min(0.0).sqrt();
  const torch::Tensor total = sigma.sum(-1, true);
  const torch::Tensor p = sigma / total.clamp_min(1e-300);
  const torch::Tensor erank = torch::exp(-torch::xlogy(p, p).sum(-1));
  return torch::where(total.squeeze(-1) > 0, erank, torch::zeros_like(erank));
}

}  // namespace

MeasureAccumulator::MeasureAccumulator(int64_t layers, int64_t heads, int64_t tokens, MeasureOptions options)
    : L_(layers), H_(heads), T_(tokens), options_(std::move(options)), pending_(layers) {
  options_.validate();
  if (options_.prefix_tokens >= T_)
    fail("--prefix-tokens {} leaves no patch tokens of the maps' {}", options_.prefix_tokens, T_);
  const auto f64 = torch::TensorOptions().dtype(torch::kDouble);
  entropy_ = torch::zeros({L_, H_}, f64);
  distance_ = torch::zeros({L_, H_}, f64);
  hsic_ = torch::zeros({L_, L_}, f64);
  if (options_.has("distance"))
    pixel_distance_ = grid_distances(T_ - options_.prefix_tokens, options_.patch_size).to(torch::kFloat).contiguous();
}

bool MeasureAccumulator::needs_maps() const { return options_.has("entropy") || options_.has("distance"); }

bool MeasureAccumulator::needs_features() const {
  return options_.has("uniformity") || options_.has("residual") || options_.has("effective_rank") ||
         options_.has("cka");
}

void MeasureAccumulator::add_maps(int64_t l, const torch::Tensor& maps) {
  if (maps.dim() != 4 || maps.size(1) != H_ || maps.size(2) != T_ || maps.size(3) != T_)
    fail("measures: expected block {}'s maps [B, {}, {}, {}], got shape {}", l, H_, T_, T_, maps.sizes().vec());
  const torch::Tensor a = maps.to(torch::kCPU, torch::kFloat).contiguous();
  const float* data = a.data_ptr<float>();
  const int64_t B = a.size(0);
  begin_maps(l, B);
  at::parallel_for(0, B * H_, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) map(bh / H_, bh % H_, data + bh * T_ * T_);
  });
  end_maps();
}

void MeasureAccumulator::begin_maps(int64_t l, int64_t B) {
  if (l < 0 || l >= L_) fail("measures: block {} of {}", l, L_);
  streaming_ = l;
  map_stats_ = torch::zeros({B, H_, 2}, torch::kDouble);
}

void MeasureAccumulator::map(int64_t b, int64_t h, const float* data) {
  const MapStats s = map_stats(data, T_, options_.prefix_tokens,
                               options_.has("distance") ? pixel_distance_.data_ptr<float>() : nullptr);
  double* out = map_stats_.data_ptr<double>() + (b * H_ + h) * 2;
  out[0] = s.entropy;
  out[1] = s.distance;
}

// Summed over the images in order, whatever threads computed them.
void MeasureAccumulator::end_maps() {
  const torch::Tensor sums = map_stats_.sum(0);  // [H, 2]
  if (options_.has("entropy")) entropy_[streaming_] += sums.select(1, 0);
  if (options_.has("distance")) distance_[streaming_] += sums.select(1, 1);
  streaming_ = -1;
}

void MeasureAccumulator::add_features(const std::vector<torch::Tensor>& features) {
  if (static_cast<int64_t>(features.size()) != L_)
    fail("measures: expected the outputs of {} blocks, got {}", L_, features.size());
  const int64_t prefix = options_.prefix_tokens;
  std::vector<torch::Tensor> uniformity, residual, effective_rank;  // per block, [B]
  for (int64_t l = 0; l < L_; ++l) {
    const torch::Tensor& f = features[l];
    if (f.dim() != 3 || f.size(1) != T_)
      fail("measures: expected block {}'s outputs [B, {}, D], got shape {}", l, T_, f.sizes().vec());
    const torch::Tensor x64 = f.to(torch::kCPU, torch::kDouble);  // once, for every measure below
    if (options_.has("residual")) residual.push_back(residual_per_image(x64));
    if (!options_.has("uniformity") && !options_.has("effective_rank")) continue;
    // Uniformity needs the tokens' Gram matrix; the effective rank takes
    // the smaller one (the same nonzero eigenvalues).
    const bool tokens_smaller = f.size(1) <= f.size(2);
    const torch::Tensor tokens = options_.has("uniformity") || tokens_smaller ? gram(x64, true) : torch::Tensor();
    if (options_.has("uniformity")) uniformity.push_back(uniformity_per_image(tokens, prefix));
    if (options_.has("effective_rank"))
      effective_rank.push_back(effective_rank_per_image(tokens_smaller ? tokens : gram(x64, false)));
  }
  for (auto [values, out] :
       {std::pair{&uniformity, &uniformity_}, {&residual, &residual_}, {&effective_rank, &effective_rank_}})
    if (!values->empty()) out->push_back(torch::stack(*values, 1));
  if (!options_.has("cka")) return;
  // Minibatches of cka_batch images in input order, across batches.
  for (int64_t b = 0; b < features[0].size(0);) {
    const int64_t have = pending_[0].defined() ? pending_[0].size(0) : 0;
    const int64_t take = std::min(options_.cka_batch - have, features[0].size(0) - b);
    for (int64_t l = 0; l < L_; ++l) {
      const torch::Tensor rows = features[l].narrow(0, b, take).reshape({take, -1}).to(torch::kCPU, torch::kDouble);
      pending_[l] = have == 0 ? rows : torch::cat({pending_[l], rows});
    }
    b += take;
    if (have + take == options_.cka_batch) {
      hsic_ += minibatch_hsic(pending_);
      ++minibatches_;
      for (auto& p : pending_) p = torch::Tensor();
    }
  }
}

void MeasureAccumulator::end_batch(int64_t n) { images_ += n; }

// HSIC₁(K, L) = [tr(K̃L̃) + 1ᵀK̃1 · 1ᵀL̃1 / ((n-1)(n-2)) - 2/(n-2) · 1ᵀK̃L̃1] / (n(n-3)),
// K̃ the Gram matrix with its diagonal zeroed (Song et al. 2012), for every
// pair of blocks at once: the traces are dot products of the flattened K̃,
// the last terms dot products of their row sums.
torch::Tensor MeasureAccumulator::minibatch_hsic(const std::vector<torch::Tensor>& pending) const {
  const int64_t n = pending[0].size(0);
  std::vector<torch::Tensor> grams;
  for (const auto& x : pending) grams.push_back(torch::matmul(x, x.t()).fill_diagonal_(0.0));
  const torch::Tensor k = torch::stack(grams);  // [L, n, n]
  const torch::Tensor flat = k.reshape({L_, n * n}), rows = k.sum(2), sums = rows.sum(1);
  const double nd = static_cast<double>(n);
  return (flat.mm(flat.t()) + torch::outer(sums, sums) / ((nd - 1) * (nd - 2)) - rows.mm(rows.t()) * (2.0 / (nd - 2))) /
         (nd * (nd - 3));
}

MeasureResult MeasureAccumulator::result() const {
  MeasureResult r;
  r.images = images_;
  if (images_ == 0) return r;
  const double images = static_cast<double>(images_);
  const int64_t patches = T_ - options_.prefix_tokens;
  if (options_.has("entropy")) r.entropy = entropy_ / (images * static_cast<double>(T_));
  if (options_.has("distance")) r.distance = distance_ / (images * static_cast<double>(patches));
  for (auto [per_batch, image, mean] : {std::tuple{&uniformity_, &r.image_uniformity, &r.uniformity},
                                        {&residual_, &r.image_residual, &r.residual},
                                        {&effective_rank_, &r.image_effective_rank, &r.effective_rank}})
    if (!per_batch->empty()) {
      *image = torch::cat(*per_batch);
      *mean = image->mean(0);
    }
  if (options_.has("cka")) {
    torch::Tensor hsic = hsic_.clone();
    int64_t minibatches = minibatches_;
    if (pending_[0].defined() && pending_[0].size(0) >= 4) {
      hsic += minibatch_hsic(pending_);
      ++minibatches;
    }
    if (minibatches > 0) {
      const torch::Tensor self = hsic.diagonal().clamp_min(0.0).sqrt();
      r.cka = hsic / torch::outer(self, self).clamp_min(1e-300);
    }
  }
  return r;
}

namespace {

nlohmann::json to_lists(const torch::Tensor& t) {
  if (t.dim() == 0) return t.item<double>();
  nlohmann::json out = nlohmann::json::array();
  for (int64_t i = 0; i < t.size(0); ++i) out.push_back(to_lists(t[i]));
  return out;
}

}  // namespace

nlohmann::json MeasureResult::to_json() const {
  nlohmann::json j = nlohmann::json::object();
  for (const auto& [key, t] : {std::pair{"attention_entropy", entropy},
                               {"mean_attention_distance", distance},
                               {"token_uniformity", uniformity},
                               {"rank_residual", residual},
                               {"effective_rank", effective_rank},
                               {"cka", cka}})
    if (t.defined()) j[key] = to_lists(t);
  return j;
}

}  // namespace vitlab
