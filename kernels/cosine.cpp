#include "kernels/cosine.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <vector>

#include "kernels/simd.h"

namespace vitlab {

static_assert(kPackedWidth == simd::kW, "a packed map's column block is one vector of lanes");

void pack_map_columns(const float* map, int64_t N, float* packed) {
  const int64_t blocks = packed_blocks(N);
  // Row by row: the map is read once, in order; each row's 8-column pieces
  // go to the blocks' streams.
  for (int64_t r = 0; r < N; ++r)
    for (int64_t i = 0; i < blocks; ++i)
      std::memcpy(packed + (i * N + r) * kPackedWidth, map + r * N + packed_column_start(i, N),
                  kPackedWidth * sizeof(float));
}

namespace {

// Whether t's last three dims are packed maps' [blocks, N, 8].
bool packed_trailing_dims(const torch::Tensor& t) {
  return t.dim() >= 3 && t.size(-1) == kPackedWidth && t.size(-2) >= kPackedWidth &&
         t.size(-3) == packed_blocks(t.size(-2));
}

}  // namespace

bool is_packed_maps(const torch::Tensor& t) { return t.dim() == 5 && packed_trailing_dims(t); }

torch::Tensor unpack_maps(const torch::Tensor& maps) {
  if (!packed_trailing_dims(maps)) return maps;
  const int64_t N = maps.size(-2), blocks = maps.size(-3);
  std::vector<int64_t> shape = maps.sizes().vec();
  shape.resize(shape.size() - 3);
  shape.insert(shape.end(), {N, blocks * kPackedWidth});
  return maps.transpose(-3, -2).reshape(shape).index_select(-1, packed_column_index(N).to(maps.device()));
}

torch::Tensor packed_column_index(int64_t N) {
  // Column t is lane t - start of block min(t / 8, blocks - 1).
  const int64_t blocks = packed_blocks(N);
  std::vector<int64_t> index(N);
  for (int64_t t = 0; t < N; ++t) {
    const int64_t i = std::min(t / kPackedWidth, blocks - 1);
    index[t] = i * kPackedWidth + t - packed_column_start(i, N);
  }
  return torch::tensor(index, torch::kLong);
}

namespace {

// 3x3: 9 accumulators and 6 loads per row fill 15 of AVX2's 16 registers.
// In 4x2 tiles GCC 12 folded the x loads into the FMAs, each twice (10
// loads per 8 FMAs), and on maps in cache took 1.6 times as long.
constexpr int64_t kP = 3, kQ = 3;
static_assert(kP % kQ == 0, "tiles starting on the diagonal cover every pair");
using simd::kW;
using simd::Lanes;

// The kP x kQ tile of lane-wise dot products of vectors p0.. and q0.. over
// their first n floats (a multiple of 8): acc[i * kQ + j][w] = sum over r
// of v[p0 + i][8r + w] * v[q0 + j][8r + w]. Past the last vector, the tile
// repeats vector K - 1 (the caller drops those results). Meanwhile it
// prefetches the first n floats of prefetch[0] and prefetch[1] (where not
// null), 32 bytes of each per row.
VITLAB_LANES void tile_dots(const float* const* v, int64_t K, int64_t p0, int64_t q0, int64_t n, Lanes* acc,
                            std::array<const float*, 2> prefetch = {}) {
  const float* a[kP];
  const float* b[kQ];
  for (int64_t i = 0; i < kP; ++i) a[i] = v[std::min(p0 + i, K - 1)];
  for (int64_t j = 0; j < kQ; ++j) b[j] = v[std::min(q0 + j, K - 1)];
  for (int64_t k = 0; k < kP * kQ; ++k) acc[k] = Lanes{};
  for (int64_t r = 0; r < n; r += kW) {
    Lanes x[kP], y[kQ];
    for (int64_t i = 0; i < kP; ++i) x[i] = simd::load(a[i] + r);
    for (int64_t j = 0; j < kQ; ++j) y[j] = simd::load(b[j] + r);
    for (int64_t i = 0; i < kP; ++i)
      for (int64_t j = 0; j < kQ; ++j) acc[i * kQ + j] += x[i] * y[j];
    if (prefetch[0]) __builtin_prefetch(prefetch[0] + r);
    if (prefetch[1]) __builtin_prefetch(prefetch[1] + r);
  }
}

}  // namespace

// dots[p][q][w] = sum over rows r of columns[p][r * 8 + w] * columns[q][r * 8 + w]
// for every p, q < K (both halves of the symmetric matrix). Unless `next`
// is null, prefetches the K columns next[0..K) (as many rows) meanwhile,
// spread over the tiles: read straight from memory, the 32 short streams
// of the cross-layer pass kept the kernel waiting (8-15% of its time).
VITLAB_CLONES void column_dots(const float* const* columns, int64_t K, int64_t rows, float* dots,
                               const float* const* next) {
  int64_t tiles = 0;
  for (int64_t p0 = 0; p0 < K; p0 += kP) tiles += (K - p0 + kQ - 1) / kQ;
  if (2 * tiles < K) next = nullptr;  // K = 3: one tile, too short to hide the loads behind
  int64_t t = 0;
  for (int64_t p0 = 0; p0 < K; p0 += kP)
    for (int64_t q0 = p0; q0 < K; q0 += kQ, ++t) {
      Lanes acc[kP * kQ];
      std::array<const float*, 2> prefetch{};  // columns t and t + tiles
      for (int64_t k = 0; k < 2; ++k)
        if (next && t + k * tiles < K) prefetch[k] = next[t + k * tiles];
      tile_dots(columns, K, p0, q0, rows * kW, acc, prefetch);
      for (int64_t i = 0; i < kP && p0 + i < K; ++i)
        for (int64_t j = 0; j < kQ && q0 + j < K; ++j) {
          // From a copy: taking acc's address would keep the tile out of registers.
          const Lanes v = acc[i * kQ + j];
          simd::store(dots + ((p0 + i) * K + q0 + j) * kW, v);
          simd::store(dots + ((q0 + j) * K + p0 + i) * kW, v);
        }
    }
}

// The cosines of one block of 8 columns from their dot products, for every
// pair p <= q (the other half is the same), added to sum[pair * 8 + w]; the
// lanes before `skip` (columns the previous block already had) add 0. Those
// >= tau are counted in above[pair * 8 + w] when above is not null, and
// the columns' squared norms added to squares[p * 8 + w] when squares is
// not null. inv: scratch of K * 8 floats.
VITLAB_CLONES bool add_block_cosines(const float* dots, int64_t K, int64_t skip, float eps, float tau, float* sum,
                                     int32_t* above, float* squares, float* inv) {
  for (int64_t p = 0; p < K; ++p)
    for (int64_t w = 0; w < kW; ++w) {
      const float square = dots[(p * K + p) * kW + w];
      if (!std::isfinite(square)) return false;
      inv[p * kW + w] = 1.0f / std::max(std::sqrt(std::max(square, 0.0f)), eps);
      if (squares && w >= skip) squares[p * kW + w] += square;
    }
  const simd::IntLanes lane = {0, 1, 2, 3, 4, 5, 6, 7};
  const auto valid = lane >= static_cast<int32_t>(skip);
  const Lanes one = simd::splat(1.0f), minus_one = simd::splat(-1.0f), zero = {}, threshold = simd::splat(tau);
  int64_t pair = 0;
  for (int64_t p = 0; p < K; ++p) {
    const Lanes inv_p = simd::load(inv + p * kW);
    for (int64_t q = p; q < K; ++q, ++pair) {
      Lanes c = simd::load(dots + (p * K + q) * kW) * inv_p * simd::load(inv + q * kW);
      c = c > one ? one : c;
      c = c < minus_one ? minus_one : c;
      c = valid ? c : zero;
      simd::store(sum + pair * kW, simd::load(sum + pair * kW) + c);
      if (above) {
        simd::IntLanes count;
        std::memcpy(&count, above + pair * kW, sizeof count);
        count -= (c >= threshold) & valid;  // true is -1
        std::memcpy(above + pair * kW, &count, sizeof count);
      }
    }
  }
  return true;
}

// dots[p * K + q] = features[p] . features[q] for every p, q < K (both
// halves), for vectors of length D, in the same 3x3 tiles as column_dots:
// the first 8 sums of a tile reduced together at the end, the ninth alone.
VITLAB_CLONES void vector_dots(const float* const* features, int64_t K, int64_t D, float* dots) {
  static_assert(kP * kQ == kW + 1, "sum8 reduces all of a tile but its last sum");
  const int64_t whole = D / kW * kW;
  for (int64_t p0 = 0; p0 < K; p0 += kP)
    for (int64_t q0 = p0; q0 < K; q0 += kQ) {
      Lanes acc[kP * kQ];
      tile_dots(features, K, p0, q0, whole, acc);
      const Lanes tile = simd::sum8(acc);
      for (int64_t i = 0; i < kP && p0 + i < K; ++i)
        for (int64_t j = 0; j < kQ && q0 + j < K; ++j) {
          const float *a = features[p0 + i], *b = features[q0 + j];
          const int64_t k = i * kQ + j;
          float dot = k < kW ? tile[k] : simd::sum(acc[k]);
          for (int64_t r = whole; r < D; ++r) dot += a[r] * b[r];
          dots[(p0 + i) * K + q0 + j] = dots[(q0 + j) * K + p0 + i] = dot;
        }
    }
}

}  // namespace vitlab
