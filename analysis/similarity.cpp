#include "analysis/similarity.h"

#include <ATen/Parallel.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>

#include "common/error.h"
#include "common/runtime.h"
#include "kernels/cosine.h"

namespace vitlab {

void SimilarityOptions::validate() const {
  if (!(tau >= -1.0 && tau <= 1.0)) fail("analysis.tau must be a cosine in [-1, 1], got {}", tau);
  if (!(similar_threshold >= -1.0 && similar_threshold <= 1.0))
    fail("analysis.similar_threshold must be a cosine in [-1, 1], got {}", similar_threshold);
  if (chunk < 0) fail("analysis.chunk must be >= 0 images (0: sized by chunk_bytes), got {}", chunk);
  if (chunk_bytes < 0) fail("analysis.chunk_bytes must be >= 0 (0: by device), got {}", chunk_bytes);
  if (!(eps > 0.0)) fail("analysis.eps must be > 0, got {}", eps);
}

SimilarityAccumulator::SimilarityAccumulator(int64_t layers, int64_t heads, int64_t tokens, SimilarityOptions options,
                                             torch::Device device)
    : L_(layers), H_(heads), T_(tokens), options_(options), device_(device) {
  options_.validate();
  if (L_ < 1 || H_ < 1 || T_ < 1)
    fail("similarity: layers, heads and tokens must be >= 1, got {}, {} and {}", L_, H_, T_);
  const auto f64 = torch::TensorOptions().dtype(torch::kDouble).device(device_);
  m_sum_ = torch::zeros({L_, L_, H_, T_}, f64);
  above_tau_ = torch::zeros({L_, L_}, f64.dtype(torch::kLong));
  head_sum_ = torch::zeros({L_, H_, H_}, f64);
  square_sum_ = torch::zeros({L_, H_}, f64);
  feature_sum_ = torch::zeros({L_, L_}, f64);
}

int64_t SimilarityAccumulator::chunk_images(int64_t feature_dim) const {
  if (options_.chunk > 0) return options_.chunk;
  // Per image, the scratch memory: the columns of all blocks side by side
  // [T, H, L, T], their cosines [T, H, L, L] with the >= tau mask (all
  // float32), one block's head cosines, and the normalised features
  // [L, T, D].
  const int64_t L = L_, H = H_, T = T_;
  const int64_t per_image = 4 * L * H * T * T + 8 * T * H * L * L + 4 * T * H * H + 4 * L * T * feature_dim;
  const int64_t budget = options_.chunk_bytes > 0 ? options_.chunk_bytes
                         : device_.is_cuda()      ? int64_t{2} << 30
                                                  : int64_t{256} << 20;
  return std::clamp<int64_t>(budget / per_image, 1, std::max<int64_t>(1, (int64_t{1} << 24) / (T * H)));
}

void SimilarityAccumulator::add(const torch::Tensor& attn, const torch::Tensor& features) {
  if (attn.dim() != 5) fail("similarity: expected attention maps [L, B, H, T, T], got shape {}", attn.sizes().vec());
  std::vector<torch::Tensor> blocks = attn.unbind(0), feature_blocks;
  if (features.defined()) {
    if (features.dim() != 4)
      fail("similarity: expected block outputs [L, B, T, D], got shape {}", features.sizes().vec());
    feature_blocks = features.unbind(0);
  }
  add(blocks, feature_blocks);
}

namespace {

// The width of a packed map's column block (kernels/cosine.h).
constexpr int64_t kW = kPackedWidth;

// A view of `shape` on buffer's memory, (re)allocated only when it grows.
torch::Tensor scratch(torch::Tensor& buffer, torch::IntArrayRef shape, torch::ScalarType dtype,
                      const torch::Device& device) {
  int64_t numel = 1;
  for (int64_t s : shape) numel *= s;
  if (!buffer.defined() || buffer.numel() < numel)
    buffer = torch::empty({numel}, torch::TensorOptions().dtype(dtype).device(device));
  return buffer.narrow(0, 0, numel).view(shape);
}

// Whether the CPU kernels take these tensors: every one contiguous float32
// on the CPU, and the kernels not switched off (cpu_kernels_enabled()).
bool cpu_kernels_take(const std::vector<torch::Tensor>& tensors) {
  return cpu_kernels_enabled() && std::all_of(tensors.begin(), tensors.end(), [](const torch::Tensor& t) {
           return t.device().is_cpu() && t.scalar_type() == torch::kFloat && t.is_contiguous();
         });
}

// Gram matrices [N, K, K] of dot products to cosines, in place: entry
// (p, q) divided by max(||p||, eps) * max(||q||, eps), the norms taken from
// the diagonal (so no separate normalising pass over the maps). Returns the
// reciprocal norms [N, K] and whether all of them are finite (a 0-dim bool
// tensor, so the caller syncs once per chunk).
std::pair<torch::Tensor, torch::Tensor> gram_to_cosine(torch::Tensor& gram, double eps) {
  torch::Tensor squares = gram.diagonal(0, 1, 2);
  torch::Tensor finite = torch::isfinite(squares).all();
  torch::Tensor inv = squares.clamp_min(0.0).sqrt().clamp_min(eps).reciprocal();
  gram.mul_(inv.unsqueeze(2)).mul_(inv.unsqueeze(1)).clamp_(-1.0, 1.0);
  return {inv, finite};
}

[[noreturn]] void fail_non_finite(const std::vector<torch::Tensor>& blocks, const char* what, const char* hint) {
  for (size_t l = 0; l < blocks.size(); ++l)
    if (!torch::isfinite(blocks[l]).all().item<bool>())
      fail("{} contain non-finite values (NaN or Inf) in block {} {}", what, l, hint);
  fail("{} overflow when squared (|values| > 1e19) {}", what, hint);
}

// Pairs p <= q of K items, in row-major order: (0,0), (0,1), ..., (1,1), ...
int64_t pair_count(int64_t K) { return K * (K + 1) / 2; }

// The values of the pairs p <= q ([pair_count(K)], row-major) as the
// symmetric [K, K] matrix.
torch::Tensor symmetric_from_pairs(const torch::Tensor& pairs, int64_t K) {
  const torch::Tensor index = torch::triu_indices(K, K);  // row-major, as pair_count's order
  torch::Tensor out = torch::zeros({K, K}, pairs.options());
  out.index_put_({index[0], index[1]}, pairs);
  out.index_put_({index[1], index[0]}, pairs);
  return out;
}

// add()'s CPU path for contiguous float32 block outputs ([B, T, D] each):
// per token, the Gram matrix of its K = L block outputs, the norms from its
// diagonal, the cosines of the pairs p <= q summed in float64. Reads each
// output once, where normalising a copy and one [L, B·T·D] x [B·T·D, L]
// sgemm read it three times (docs/BENCHMARKS.md). Returns the sums as the
// symmetric [L, L] matrix, or an undefined tensor when a norm is not finite.
torch::Tensor feature_cosine_sums_cpu(const std::vector<torch::Tensor>& features, double eps) {
  const int64_t L = static_cast<int64_t>(features.size()), N = features[0].size(0) * features[0].size(1),
                D = features[0].size(2), pairs = pair_count(L);
  std::vector<const float*> base;
  for (const auto& f : features) base.push_back(f.data_ptr<float>());
  // Fixed runs of tokens, each with its own sums, added in order: the
  // result does not depend on the number of threads.
  constexpr int64_t kRun = 64;
  const int64_t runs = (N + kRun - 1) / kRun;
  std::vector<double> partial(static_cast<size_t>(runs * pairs), 0.0);
  std::atomic<bool> finite{true};
  at::parallel_for(0, runs, 1, [&](int64_t begin, int64_t end) {
    std::vector<const float*> token(L);
    std::vector<float> dots(L * L), inv(L);
    for (int64_t run = begin; run < end; ++run)
      for (int64_t t = run * kRun; t < std::min(N, (run + 1) * kRun); ++t) {
        for (int64_t l = 0; l < L; ++l) token[l] = base[l] + t * D;
        vector_dots(token.data(), L, D, dots.data());
        for (int64_t p = 0; p < L; ++p) {
          if (!std::isfinite(dots[p * L + p])) finite = false;
          inv[p] = 1.0f / std::max(std::sqrt(std::max(dots[p * L + p], 0.0f)), static_cast<float>(eps));
        }
        double* sum = partial.data() + run * pairs;
        for (int64_t p = 0, pair = 0; p < L; ++p)
          for (int64_t q = p; q < L; ++q, ++pair)
            sum[pair] += std::clamp(dots[p * L + q] * inv[p] * inv[q], -1.0f, 1.0f);
      }
  });
  if (!finite) return {};
  torch::Tensor sums = torch::zeros({pairs}, torch::kDouble);
  double* total = sums.data_ptr<double>();
  for (int64_t run = 0; run < runs; ++run)
    for (int64_t pair = 0; pair < pairs; ++pair) total[pair] += partial[run * pairs + pair];
  return symmetric_from_pairs(sums, L);
}

// Image b's S[k-1, k] for every k, from what it added to the CPU kernel's
// cross-layer sums [H, blocks, pairs, 8] (`seen`: the sums before it, per k,
// updated): its sums over heads and tokens over H * T.
void record_image_adjacent(const float* sum, int64_t H, int64_t blocks, int64_t L, int64_t T, std::vector<double>& seen,
                           double* out) {
  const int64_t pairs = pair_count(L);
  for (int64_t k = 1; k < L; ++k) {
    const int64_t pair = (k - 1) * L - (k - 1) * (k - 2) / 2 + 1;  // (k-1, k) among the pairs p <= q, row-major
    double total = 0.0;
    for (int64_t run = 0; run < H * blocks; ++run)
      for (int64_t w = 0; w < kW; ++w) total += sum[(run * pairs + pair) * kW + w];
    out[k - 1] = (total - seen[k - 1]) / static_cast<double>(H * T);
    seen[k - 1] = total;
  }
}

// add()'s CPU path for float32 maps, [B, H, T, T] or packed by column
// blocks ([B, H, blocks, T, 8], as the attention kernel captures them;
// others are packed here, an image at a time, into `packing`). Image by
// image, in parallel over column blocks: a block's columns of every map
// (2.4 MB for 32 blocks x 12 heads at T = 197) are read from memory once,
// by the cross-layer pass over the heads, and found in cache by the
// inter-head pass over the blocks that follows. The cross-layer sums go to
// `sum` in the kernel's layout [H, column blocks, pairs p <= q, 8]
// (unpacked by unpack_kernel_sums); the rest, kept per column block so that
// no two threads add to the same sums (and the result does not depend on
// their number), to above_tau, head_sum and square_sum as add() keeps them;
// each image's adjacent similarities to image_adjacent [B, L-1].
void add_maps_cpu(const std::vector<torch::Tensor>& attn, bool packed, const SimilarityOptions& o, torch::Tensor& sum,
                  torch::Tensor& above_tau, torch::Tensor& head_sum, torch::Tensor& square_sum,
                  torch::Tensor& image_adjacent, torch::Tensor& packing) {
  const int64_t L = static_cast<int64_t>(attn.size()), B = attn[0].size(0), H = attn[0].size(1);
  const int64_t T = attn[0].size(packed ? 3 : 2), blocks = packed_blocks(T), layer_pairs = pair_count(L),
                head_pairs = pair_count(H), map_size = blocks * T * kW;
  const auto eps = static_cast<float>(o.eps), tau = static_cast<float>(o.tau);
  torch::Tensor above = torch::zeros({blocks, H, layer_pairs, kW}, torch::kInt);
  torch::Tensor squares = torch::zeros({blocks, H, L, kW}, torch::kFloat);
  torch::Tensor heads = torch::zeros({blocks, L, head_pairs, kW}, torch::kFloat);  // over the block's columns
  float *sum_data = sum.data_ptr<float>(), *squares_data = squares.data_ptr<float>(),
        *heads_data = heads.data_ptr<float>();
  int32_t* above_data = above.data_ptr<int32_t>();
  std::atomic<bool> finite{true};
  std::vector<const float*> maps(L * H);  // image b's packed map of block l, head h at l * H + h
  std::vector<double> seen(static_cast<size_t>(L), 0.0);
  for (int64_t b = 0; b < B; ++b) {
    if (packed) {
      for (int64_t l = 0; l < L; ++l)
        for (int64_t h = 0; h < H; ++h) maps[l * H + h] = attn[l].data_ptr<float>() + (b * H + h) * map_size;
    } else {
      float* out = scratch(packing, {L * H * map_size}, torch::kFloat, torch::kCPU).data_ptr<float>();
      at::parallel_for(0, L * H, 1, [&](int64_t begin, int64_t end) {
        for (int64_t m = begin; m < end; ++m)
          pack_map_columns(attn[m / H].data_ptr<float>() + (b * H + m % H) * T * T, T, out + m * map_size);
      });
      for (int64_t m = 0; m < L * H; ++m) maps[m] = out + m * map_size;
    }
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      const int64_t K = std::max(L, H);
      std::vector<float> dots(static_cast<size_t>((K * K + K) * kW));  // the dot products, then the reciprocal norms
      std::vector<const float*> columns(K), next(K);
      for (int64_t i = begin; i < end; ++i) {
        const int64_t offset = i * T * kW, skip = i * kW - packed_column_start(i, T);
        // Each pass prefetches the next one's columns: the next head's, the
        // next block's.
        for (int64_t h = 0; h < H; ++h) {
          for (int64_t l = 0; l < L; ++l) {
            columns[l] = maps[l * H + h] + offset;
            if (h + 1 < H) next[l] = maps[l * H + h + 1] + offset;
          }
          column_dots(columns.data(), L, T, dots.data(), h + 1 < H ? next.data() : nullptr);
          if (!add_block_cosines(dots.data(), L, skip, eps, tau, sum_data + (h * blocks + i) * layer_pairs * kW,
                                 above_data + (i * H + h) * layer_pairs * kW, squares_data + (i * H + h) * L * kW,
                                 dots.data() + L * L * kW))
            finite = false;
        }
        for (int64_t l = 0; l < L; ++l) {
          for (int64_t h = 0; h < H; ++h) {
            columns[h] = maps[l * H + h] + offset;
            if (l + 1 < L) next[h] = maps[(l + 1) * H + h] + offset;
          }
          column_dots(columns.data(), H, T, dots.data(), l + 1 < L ? next.data() : nullptr);
          add_block_cosines(dots.data(), H, skip, eps, tau, heads_data + (i * L + l) * head_pairs * kW, nullptr,
                            nullptr, dots.data() + H * H * kW);
        }
      }
    });
    if (!finite) fail_non_finite(attn, "attention maps", "(weights overflow? an fp16 forward pass out of range?)");
    record_image_adjacent(sum_data, H, blocks, L, T, seen, image_adjacent.data_ptr<double>() + b * (L - 1));
  }
  // Counted in a plain loop: LibTorch's int32 -> int64 sum over these dims
  // took 20-33 ms in each of a process's first two batches of 4 images (1
  // ms after, as this loop does every time; docs/BENCHMARKS.md, stop 29).
  torch::Tensor counts = torch::zeros({layer_pairs}, torch::kLong);
  int64_t* count = counts.data_ptr<int64_t>();
  for (int64_t run = 0; run < blocks * H; ++run)
    for (int64_t pair = 0; pair < layer_pairs; ++pair)
      for (int64_t w = 0; w < kW; ++w) count[pair] += above_data[(run * layer_pairs + pair) * kW + w];
  above_tau += symmetric_from_pairs(counts, L).to(above_tau.options());
  square_sum += squares.sum(torch::IntArrayRef{0, 3}, false, torch::kDouble).t().to(square_sum.options());
  const torch::Tensor head_pair_sums = heads.sum(torch::IntArrayRef{0, 3}, false, torch::kDouble);  // [L, pairs]
  for (int64_t l = 0; l < L; ++l) head_sum[l] += symmetric_from_pairs(head_pair_sums[l], H).to(head_sum.options());
}

// The CPU kernel's cross-layer sums [H, blocks of 8 columns, pairs p <= q,
// 8] as [L, L, H, T].
torch::Tensor unpack_kernel_sums(const torch::Tensor& sum, int64_t L, int64_t T) {
  const int64_t H = sum.size(0), blocks = sum.size(1), pairs = sum.size(2);
  const torch::Tensor columns = sum.permute({2, 0, 1, 3})
                                    .reshape({pairs, H, blocks * kW})
                                    .index_select(2, packed_column_index(T));  // [pairs, H, T]
  const torch::Tensor index = torch::triu_indices(L, L);
  torch::Tensor out = torch::zeros({L * L, H, T}, sum.options());
  out.index_copy_(0, index[0] * L + index[1], columns);
  out.index_copy_(0, index[1] * L + index[0], columns);
  return out.view({L, L, H, T});
}

}  // namespace

// The maps' part of add() for images [b0, b0 + n) on any device: batched
// matrix products on a transposed copy of the maps.
void SimilarityAccumulator::add_maps_chunk(const std::vector<torch::Tensor>& attn, int64_t b0, int64_t n,
                                           torch::Tensor& image_adjacent, torch::Tensor& m_sum,
                                           torch::Tensor& above_tau, torch::Tensor& head_sum,
                                           torch::Tensor& square_sum) {
  const int64_t L = L_, H = H_, T = T_;
  // X [n, T(column), H, L, T(row)]: column t of every block side by side,
  // the one copy made of the maps.
  // (Filled block by block: torch::stack of permuted views may pick a
  // channels-last layout.)
  torch::Tensor X = scratch(columns_, {n, T, H, L, T}, torch::kFloat, device_);
  for (int64_t l = 0; l < L; ++l) X.select(3, l).copy_(attn[l].narrow(0, b0, n).permute({0, 3, 1, 2}));
  // Cross-layer: every pair of blocks for each (image, column, head) in one bmm.
  torch::Tensor flat = X.view({n * T * H, L, T});
  torch::Tensor G = scratch(gram_, {n * T * H, L, L}, torch::kFloat, device_);
  at::bmm_out(G, flat, flat.transpose(1, 2));
  // The squared column norms, summed over images and columns: [H, L] -> [L, H].
  square_sum += at::sum(G.diagonal(0, 1, 2).view({n, T, H, L}), torch::IntArrayRef{0, 1}, false, torch::kDouble).t();
  auto [inv_norm, finite] = gram_to_cosine(G, options_.eps);
  if (!finite.item<bool>())
    fail_non_finite(attn, "attention maps", "(weights overflow? an fp16 forward pass out of range?)");
  // Sums over the chunk's images as products with a ones vector (a plain
  // reduction over the outer dim is several times slower on the CPU), in
  // float32. The counts are exact: chunk_images keeps n*T*H below 2^24.
  const auto f32 = torch::TensorOptions().dtype(torch::kFloat).device(device_);
  m_sum += torch::mm(torch::ones({1, n}, f32), G.view({n, T * H * L * L})).view({T, H, L, L}).permute({2, 3, 1, 0});
  image_adjacent.narrow(0, b0, n).copy_(
      G.view({n, T * H, L, L}).diagonal(1, 2, 3).sum(1, false, torch::kDouble).div(static_cast<double>(T * H)));
  torch::Tensor mask = scratch(mask_, {n * T * H, L * L}, torch::kFloat, device_);
  at::ge_out(mask, G.view({n * T * H, L * L}), options_.tau);
  above_tau += torch::mm(torch::ones({1, n * T * H}, f32), mask).view({L, L}).round().to(torch::kLong);
  // Inter-head: every pair of heads for each (image, column), one bmm per
  // block on a strided view of X (no copy); the norms are the ones above.
  inv_norm = inv_norm.reshape({n * T, H, L});
  for (int64_t l = 0; l < L; ++l) {
    torch::Tensor Y = X.select(3, l).view({n * T, H, T});
    torch::Tensor GH = torch::bmm(Y, Y.transpose(1, 2));  // [n*T, H, H]
    torch::Tensor inv = inv_norm.select(2, l);
    GH.mul_(inv.unsqueeze(2)).mul_(inv.unsqueeze(1)).clamp_(-1.0, 1.0);
    head_sum[l] += at::sum(GH, {0}, false, torch::kDouble);
  }
}

void SimilarityAccumulator::add(const std::vector<torch::Tensor>& attn, const std::vector<torch::Tensor>& features) {
  const int64_t L = L_, H = H_, T = T_;
  if (static_cast<int64_t>(attn.size()) != L)
    fail("similarity: got attention maps of {} blocks, expected {}", attn.size(), L);
  const int64_t B = attn[0].dim() == 4 || is_packed_maps(attn[0]) ? attn[0].size(0) : -1;
  int64_t packed_count = 0;
  for (int64_t l = 0; l < L; ++l) {
    const auto& a = attn[l];
    const bool packed = is_packed_maps(a);
    packed_count += packed;
    if ((a.dim() != 4 && !packed) || a.size(0) != B || a.size(1) != H || a.size(packed ? 3 : 2) != T ||
        (!packed && a.size(3) != T))
      fail(
          "similarity: block {}'s attention map has shape {}, expected [B, H, T, T] = [{}, {}, {}, {}] (or packed "
          "by column blocks, [B, H, {}, T, 8])",
          l, a.sizes().vec(), B, H, T, T, T >= kW ? packed_blocks(T) : 0);
    if (!a.is_floating_point())
      fail("similarity: attention maps must be floating point, got {}", c10::toString(a.scalar_type()));
  }
  const bool with_features = !features.empty();
  if (with_features && static_cast<int64_t>(features.size()) != L)
    fail("similarity: got block outputs of {} blocks, expected {}", features.size(), L);
  if (images_ > 0 && with_features != (feature_images_ > 0))
    fail("similarity: give block outputs with every batch or with none");
  int64_t D = 0, TF = 0;
  if (with_features) {
    D = features[0].dim() == 3 ? features[0].size(2) : -1;
    TF = features[0].dim() == 3 ? features[0].size(1) : -1;
    for (int64_t l = 0; l < L; ++l) {
      const auto& f = features[l];
      if (f.dim() != 3 || f.size(0) != B || f.size(1) != TF || f.size(2) != D || !f.is_floating_point())
        fail("similarity: block {}'s output has shape {} ({}), expected float [B, T, D] = [{}, {}, {}]", l,
             f.sizes().vec(), c10::toString(f.scalar_type()), B, TF, D);
    }
  }
  if (B == 0) return;
  // Packed maps go to the CPU kernel as they are; anything else sees them
  // [B, H, T, T].
  const bool packed = packed_count == L && !options_.center && device_.is_cpu() && cpu_kernels_take(attn);
  std::vector<torch::Tensor> unpacked;
  if (packed_count > 0 && !packed)
    for (const auto& a : attn) unpacked.push_back(unpack_maps(a));
  const std::vector<torch::Tensor>& rows = unpacked.empty() ? attn : unpacked;
  std::vector<torch::Tensor> centred;
  if (options_.center)
    for (const auto& a : rows) {
      // Half-precision maps are centred in float32; dim 3 is the input tokens.
      const torch::Tensor f = a.element_size() < 4 ? a.to(torch::kFloat) : a;
      centred.push_back(f - f.mean(3, /*keepdim=*/true));
    }
  const std::vector<torch::Tensor>& maps = options_.center ? centred : rows;

  const int64_t chunk = chunk_images(D);
  const double eps = options_.eps;
  // This batch's sums, added to the totals only once all of it is checked:
  // a batch with a non-finite map leaves the accumulator as it was.
  // m_sum is float32: sums over one batch's images, added to the float64
  // total once per batch.
  // The CPU kernel keeps its own layout of them (unpacked in result()).
  torch::Tensor above_tau = torch::zeros_like(above_tau_);
  torch::Tensor head_sum = torch::zeros_like(head_sum_), feature_sum = torch::zeros_like(feature_sum_);
  torch::Tensor square_sum = torch::zeros_like(square_sum_);
  torch::Tensor image_adjacent = torch::zeros({B, L - 1}, torch::kDouble);
  const bool cpu_kernel = device_.is_cpu() && T >= kW && cpu_kernels_take(maps);
  const bool feature_kernel = with_features && device_.is_cpu() && cpu_kernels_take(features);
  torch::Tensor m_sum;
  if (cpu_kernel) {
    m_sum = scratch(batch_sum_, {H, (T + kW - 1) / kW, pair_count(L), kW}, torch::kFloat, device_).zero_();
    add_maps_cpu(maps, packed, options_, m_sum, above_tau, head_sum, square_sum, image_adjacent, columns_);
  } else {
    m_sum = scratch(batch_sum_, m_sum_.sizes(), torch::kFloat, device_).zero_();
  }
  if (feature_kernel) {
    feature_sum = feature_cosine_sums_cpu(features, eps);
    if (!feature_sum.defined()) fail_non_finite(features, "block outputs", "(weights overflow?)");
  }
  // What the kernels above did not take goes through batched products.
  const bool products = !cpu_kernel || (with_features && !feature_kernel);
  for (int64_t b0 = 0; products && b0 < B; b0 += chunk) {
    const int64_t n = std::min(chunk, B - b0);
    if (!cpu_kernel) add_maps_chunk(maps, b0, n, image_adjacent, m_sum, above_tau, head_sum, square_sum);
    if (with_features && !feature_kernel) {
      // The sum over tokens of cos(F_p[t], F_q[t]) is the dot product of
      // blocks p and q's outputs with every token vector normalised, all
      // tokens flattened into one row: one [L, n*T*D] x [n*T*D, L] product
      // instead of n*T small Gram matrices (LibTorch's bmm would launch one
      // per token).
      torch::Tensor F = scratch(normalised_features_, {L, n, TF, D}, torch::kFloat, device_);
      torch::Tensor finite = torch::ones({}, torch::TensorOptions().dtype(torch::kBool).device(device_));
      for (int64_t l = 0; l < L; ++l) {
        const torch::Tensor f = features[l].narrow(0, b0, n).to(torch::kFloat);
        const torch::Tensor norm = at::linalg_vector_norm(f, 2, torch::IntArrayRef{2}, /*keepdim=*/true);
        finite.logical_and_(torch::isfinite(norm).all());
        torch::Tensor out = F[l];
        at::div_out(out, f, norm.clamp_min(eps));
      }
      if (!finite.item<bool>()) fail_non_finite(features, "block outputs", "(weights overflow?)");
      const torch::Tensor flat = F.view({L, n * TF * D});
      feature_sum += torch::mm(flat, flat.t()).to(torch::kDouble);
    }
  }
  if (!cpu_kernel) {
    m_sum_ += m_sum;
  } else if (kernel_sum_.defined()) {
    kernel_sum_ += m_sum;
  } else {
    kernel_sum_ = m_sum.to(torch::kDouble);
  }
  above_tau_ += above_tau;
  head_sum_ += head_sum;
  square_sum_ += square_sum;
  image_adjacent_.push_back(image_adjacent);
  images_ += B;
  if (with_features) {
    feature_sum_ += feature_sum;
    feature_tokens_ += B * TF;
    feature_images_ += B;
  }
}

SimilarityResult SimilarityAccumulator::result() const {
  if (images_ == 0) fail("similarity: no images were analysed (an empty input or data split?)");
  const int64_t L = L_, H = H_, T = T_;
  SimilarityResult r;
  r.images = images_;
  r.layers = L;
  r.heads = H;
  r.tokens = T;
  r.options = options_;
  r.image_adjacent = torch::cat(image_adjacent_);
  const auto cpu = [](const torch::Tensor& t) { return t.to(torch::kCPU).contiguous(); };
  torch::Tensor sum = kernel_sum_.defined() ? m_sum_ + unpack_kernel_sums(kernel_sum_, L, T) : m_sum_;
  torch::Tensor mean = sum / static_cast<double>(images_);  // [L, L, H, T]
  r.M = cpu(mean.to(torch::kFloat));
  r.S = cpu(mean.mean({2, 3}));
  r.adjacent = L > 1 ? r.S.diagonal(1).contiguous() : torch::zeros({0}, torch::kDouble);
  r.ratio = cpu(above_tau_.to(torch::kDouble) / static_cast<double>(images_ * H * T));
  r.similar_blocks = r.adjacent.ge(options_.similar_threshold).sum().item<int64_t>();
  r.similar_blocks_ratio = static_cast<double>(r.similar_blocks) / static_cast<double>(L);
  r.inter_head = cpu(head_sum_ / static_cast<double>(images_ * T));
  if (H > 1) {
    torch::Tensor diag = r.inter_head.diagonal(0, 1, 2).sum(1);
    r.inter_head_mean = (r.inter_head.sum({1, 2}) - diag) / static_cast<double>(H * (H - 1));
  } else {
    r.inter_head_mean = torch::full({L}, std::numeric_limits<double>::quiet_NaN(), torch::kDouble);
  }
  if (feature_images_ > 0) r.feature_similarity = cpu(feature_sum_ / static_cast<double>(feature_tokens_));
  r.row_square_norm = cpu(square_sum_ / static_cast<double>(images_ * T));
  return r;
}

namespace {

// A float tensor as nested JSON lists; NaN becomes null.
nlohmann::json to_json_lists(const torch::Tensor& t) {
  if (!t.defined()) return nullptr;
  torch::Tensor d = t.to(torch::kCPU, torch::kDouble).contiguous();
  if (d.dim() == 0) {
    const double v = d.item<double>();
    return std::isfinite(v) ? nlohmann::json(v) : nlohmann::json();
  }
  nlohmann::json out = nlohmann::json::array();
  for (int64_t i = 0; i < d.size(0); ++i) out.push_back(to_json_lists(d[i]));
  return out;
}

nlohmann::json number_or_null(double v) { return std::isfinite(v) ? nlohmann::json(v) : nlohmann::json(); }

}  // namespace

nlohmann::json SimilarityResult::to_json() const {
  nlohmann::json j;
  j["images"] = images;
  j["layers"] = layers;
  j["heads"] = heads;
  j["tokens"] = tokens;
  j["parameters"] = {{"tau", options.tau},
                     {"similar_threshold", options.similar_threshold},
                     {"eps", options.eps},
                     {"center", options.center}};
  j["cross_layer"] = to_json_lists(S);
  j["adjacent"] = to_json_lists(adjacent);
  j["adjacent_mean"] = adjacent.numel() > 0 ? number_or_null(adjacent.mean().item<double>()) : nlohmann::json();
  j["ratio"] = to_json_lists(ratio);
  j["similar_blocks"] = similar_blocks;
  j["similar_blocks_ratio"] = similar_blocks_ratio;
  j["inter_head"] = to_json_lists(inter_head);
  j["inter_head_mean"] = to_json_lists(inter_head_mean);
  j["inter_head_mean_overall"] = heads > 1 ? number_or_null(inter_head_mean.mean().item<double>()) : nlohmann::json();
  j["feature_similarity"] = to_json_lists(feature_similarity);
  j["row_square_norm"] = to_json_lists(row_square_norm);
  j["row_square_norm_mean"] = to_json_lists(row_square_norm.mean(1));
  return j;
}

void RolloutOptions::validate() const {
  if (head_fusion != "mean" && head_fusion != "max" && head_fusion != "min")
    fail("rollout head fusion must be mean, max or min, got '{}'", head_fusion);
  if (!(discard_ratio >= 0.0 && discard_ratio < 1.0))
    fail("rollout discard ratio must be in [0, 1), got {}", discard_ratio);
}

torch::Tensor fuse_heads(const torch::Tensor& maps, const std::string& head_fusion) {
  if (head_fusion == "max") return std::get<0>(maps.max(1, /*keepdim=*/true));
  if (head_fusion == "min") return std::get<0>(maps.min(1, /*keepdim=*/true));
  return maps.mean(1, /*keepdim=*/true);
}

namespace {

// Zeroes the lowest `ratio` of each map's entries in m [B, T, T], but [0, 0].
void discard_lowest(torch::Tensor& m, double ratio) {
  const int64_t B = m.size(0), count = static_cast<int64_t>(static_cast<double>(m[0].numel()) * ratio);
  if (count == 0) return;
  torch::Tensor flat = m.reshape({B, -1});
  const torch::Tensor lowest = std::get<1>(flat.topk(count, -1, /*largest=*/false));
  torch::Tensor keep = torch::ones_like(flat, torch::kBool).scatter_(1, lowest, false);
  keep.select(1, 0).fill_(true);
  m = (flat * keep).view_as(m);
}

}  // namespace

torch::Tensor attention_rollout(const std::vector<torch::Tensor>& attn, const RolloutOptions& options) {
  options.validate();
  if (attn.empty()) fail("attention rollout: no blocks");
  torch::Tensor rollout;
  for (size_t l = 0; l < attn.size(); ++l) {
    const auto& a = attn[l];
    if (a.dim() != 4 || a.size(2) != a.size(3))
      fail("attention rollout: block {}'s map has shape {}, expected [B, H, T, T]", l, a.sizes().vec());
    torch::Tensor m = fuse_heads(a.to(torch::kFloat), options.head_fusion).squeeze(1).clamp_min(0.0);
    discard_lowest(m, options.discard_ratio);
    m = m + torch::eye(m.size(1), m.options());
    m = m / m.sum(-1, /*keepdim=*/true);
    rollout = rollout.defined() ? torch::bmm(m, rollout) : m;
  }
  return rollout;
}

}  // namespace vitlab
