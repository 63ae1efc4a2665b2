#include "kernels/head_mixing.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <numeric>
#include <vector>

#include "kernels/simd.h"

namespace vitlab {

namespace {

using simd::kW;
using simd::Lanes;

constexpr int64_t kTile = 3;  // register tiles of 3 × 3 vectors (9 sums, 6 operands: 15 of AVX2's 16 registers)
constexpr int64_t kMixCols = 42 * kTile * kW;  // columns of one mixing task, whole tiles (1008)
constexpr int64_t kGramCols = 2048;            // columns of one Gram task (one partial sum)
constexpr int64_t kGramBlock = 256;            // columns of a Gram task held in L1 at a time
// How far ahead of the columns in use to prefetch each row: the 12-24 rows
// streamed side by side kept the hardware prefetcher behind.
constexpr int64_t kPrefetchAhead = 256;

// out[g][j] = c[g] + Σ_k w[g][k] rows[k][j] for j < cols; wb holds w [H, K]
// with each weight in all kW lanes (broadcast_weights), rows and out have
// row stride L. Register tiles of 3 outputs × 24 columns: each loaded
// vector of a row feeds three multiply-adds, each weight three, and the K
// rows of a tile stay in L1 across the H outputs. Operands are loaded into
// registers before use: with 2 × 32 tiles GCC 12 folded each row load into
// both of its multiply-adds. Weights come pre-broadcast because
// simd::splat costs a scalar add of zero besides the broadcast.
VITLAB_CLONES void mix_columns(int64_t H, int64_t K, const float* wb, const float* const* rows, const float* c,
                               float* out, int64_t L, int64_t cols) {
  constexpr int64_t kCols = kTile * kW;
  int64_t j = 0;
  for (; j + kCols <= cols; j += kCols)
    for (int64_t g0 = 0; g0 < H; g0 += kTile) {
      int64_t g[kTile];  // past H, the last output again (computed twice, stored twice)
      for (int64_t i = 0; i < kTile; ++i) g[i] = std::min(g0 + i, H - 1);
      Lanes a[kTile][kTile];
      for (int64_t i = 0; i < kTile; ++i)
        for (int64_t q = 0; q < kTile; ++q) a[i][q] = simd::splat(c[g[i]]);
      for (int64_t k = 0; k < K; ++k) {
        Lanes x[kTile], wk[kTile];
        for (int64_t q = 0; q < kTile; ++q) x[q] = simd::load(rows[k] + j + q * kW);
        if (g0 == 0) {  // a tile's 24 columns span two 64-byte lines
          __builtin_prefetch(rows[k] + j + kPrefetchAhead);
          __builtin_prefetch(rows[k] + j + kPrefetchAhead + 16);
        }
        for (int64_t i = 0; i < kTile; ++i) wk[i] = simd::load(wb + (g[i] * K + k) * kW);
        for (int64_t i = 0; i < kTile; ++i)
          for (int64_t q = 0; q < kTile; ++q) a[i][q] += wk[i] * x[q];
      }
      for (int64_t i = 0; i < kTile; ++i)
        for (int64_t q = 0; q < kTile; ++q) simd::store(out + g[i] * L + j + q * kW, a[i][q]);
    }
  for (; j + kW <= cols; j += kW)
    for (int64_t g = 0; g < H; ++g) {
      Lanes acc = simd::splat(c[g]);
      for (int64_t k = 0; k < K; ++k) acc += simd::load(wb + (g * K + k) * kW) * simd::load(rows[k] + j);
      simd::store(out + g * L + j, acc);
    }
  for (; j < cols; ++j)
    for (int64_t g = 0; g < H; ++g) {
      float acc = c[g];
      for (int64_t k = 0; k < K; ++k) acc += wb[(g * K + k) * kW] * rows[k][j];
      out[g * L + j] = acc;
    }
}

// Each of the n weights w[i] repeated in kW lanes, for mix_columns.
std::vector<float> broadcast_weights(const float* w, int64_t n) {
  std::vector<float> wb(static_cast<size_t>(n * kW));
  for (int64_t i = 0; i < n; ++i) std::fill_n(wb.begin() + i * kW, kW, w[i]);
  return wb;
}

VITLAB_LANES void add(float* p, Lanes v) { simd::store(p, simd::load(p) + v); }

// out[g][j] = rows[g][j] - shift for H rows (row stride L) and j < n, a
// multiple of 8, into out (row stride kGramBlock); adds each row's sum to
// lanes g of sums when sums is not null.
VITLAB_LANES void shift_block(int64_t H, const float* rows, int64_t L, int64_t n, Lanes shift, float* out,
                              float* sums) {
  for (int64_t g = 0; g < H; ++g) {
    Lanes s = {};
    for (int64_t j = 0; j < n; j += kW) {
      __builtin_prefetch(rows + g * L + j + kPrefetchAhead);
      const Lanes v = simd::load(rows + g * L + j) - shift;
      simd::store(out + g * kGramBlock + j, v);
      s += v;
    }
    if (sums) add(sums + g * kW, s);
  }
}

// Lanes (g * H + h) of acc += Σ_j (x[g][j] - sx)(y[h][j] - sy) and lanes g of
// sums += Σ_j (x[g][j] - sx), lane by lane, for H rows of x and y (row
// stride L) over cols columns, a multiple of 8. A block of kGramBlock
// columns of each, shifted, is copied into L1 (block: 2 H kGramBlock floats
// of scratch), which leaves registers for 3 × 3 tiles of dot products.
// When x and y are the same rows with the same shift (the statistics of
// one tensor), there is one copy and only the tiles with h >= g are
// computed, then mirrored.
VITLAB_CLONES void gram_columns(int64_t H, const float* x, const float* y, int64_t L, int64_t cols, float sx, float sy,
                                float* acc, float* sums, float* block) {
  const bool symmetric = x == y && sx == sy;
  float* xb = block;
  float* yb = symmetric ? block : block + H * kGramBlock;
  for (int64_t j0 = 0; j0 < cols; j0 += kGramBlock) {
    const int64_t n = std::min(cols - j0, kGramBlock);
    shift_block(H, x + j0, L, n, simd::splat(sx), xb, sums);
    if (!symmetric) shift_block(H, y + j0, L, n, simd::splat(sy), yb, nullptr);
    for (int64_t g0 = 0; g0 < H; g0 += kTile)
      for (int64_t h0 = symmetric ? g0 : 0; h0 < H; h0 += kTile) {
        const float *xr[kTile], *yr[kTile];  // past H, the last row again (its sums dropped)
        for (int64_t i = 0; i < kTile; ++i) {
          xr[i] = xb + std::min(g0 + i, H - 1) * kGramBlock;
          yr[i] = yb + std::min(h0 + i, H - 1) * kGramBlock;
        }
        Lanes t[kTile][kTile] = {};
        for (int64_t j = 0; j < n; j += kW) {
          Lanes xv[kTile], yv[kTile];
          for (int64_t i = 0; i < kTile; ++i) xv[i] = simd::load(xr[i] + j);
          for (int64_t i = 0; i < kTile; ++i) yv[i] = simd::load(yr[i] + j);
          for (int64_t i = 0; i < kTile; ++i)
            for (int64_t q = 0; q < kTile; ++q) t[i][q] += xv[i] * yv[q];
        }
        for (int64_t i = 0; i < kTile && g0 + i < H; ++i)
          for (int64_t q = 0; q < kTile && h0 + q < H; ++q) {
            const Lanes v = t[i][q];  // a copy: taking t's address would keep the tile out of registers
            add(acc + ((g0 + i) * H + h0 + q) * kW, v);
            if (symmetric && h0 != g0) add(acc + ((h0 + q) * H + g0 + i) * kW, v);
          }
      }
  }
}

// Adds Σ (x_g - sx)(y_h - sy) to out[g * H + h] and Σ (x_g - sx) to
// out[H * H + g] (float64) over cols columns of H rows (row stride L);
// scratch is float scratch.
void gram_chunk(int64_t H, const float* x, double sx, const float* y, double sy, int64_t L, int64_t cols,
                std::vector<float>& scratch, double* out) {
  const int64_t lanes = cols / kW * kW;
  scratch.resize(static_cast<size_t>((H * H + H) * kW + 2 * H * kGramBlock));
  float *acc = scratch.data(), *sums = acc + H * H * kW;
  std::fill(acc, sums + H * kW, 0.0f);  // the block after them is written before it is read
  gram_columns(H, x, y, L, lanes, static_cast<float>(sx), static_cast<float>(sy), acc, sums, sums + H * kW);
  for (int64_t i = 0; i < H * H; ++i) out[i] += std::accumulate(&acc[i * kW], &acc[i * kW] + kW, 0.0);
  for (int64_t g = 0; g < H; ++g) out[H * H + g] += std::accumulate(sums + g * kW, sums + (g + 1) * kW, 0.0);
  for (int64_t j = lanes; j < cols; ++j)  // the last few columns of a map
    for (int64_t g = 0; g < H; ++g) {
      const double xg = x[g * L + j] - sx;
      out[H * H + g] += xg;
      for (int64_t h = 0; h < H; ++h) out[g * H + h] += xg * (y[h * L + j] - sy);
    }
}

void check_maps(const torch::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 4 && x.size(2) == x.size(3), "head mixing: ", name, " must be [B, H, N, N] maps, got ",
              x.sizes());
  TORCH_CHECK(head_mixing_applies(x), "head mixing: ", name, " must be float32 on the CPU, got ", x.scalar_type(),
              " on ", x.device());
}

void check_same(const torch::Tensor& a, const torch::Tensor& b, const char* a_name, const char* b_name) {
  TORCH_CHECK(a.sizes() == b.sizes(), "head mixing: ", a_name, " ", a.sizes(), " and ", b_name, " ", b.sizes(),
              " must have the same shape");
}

}  // namespace

bool head_mixing_applies(const torch::Tensor& x) { return x.device().is_cpu() && x.scalar_type() == torch::kFloat; }

void mix_image(int64_t H, const float* w, const float* x1, const float* x2, const float* c, float* out, int64_t L) {
  const int64_t K = x2 ? 2 * H : H;
  const std::vector<float> wb = broadcast_weights(w, H * K);
  std::vector<const float*> rows(K);
  for (int64_t j0 = 0; j0 < L; j0 += kMixCols) {
    for (int64_t h = 0; h < H; ++h) {
      rows[h] = x1 + h * L + j0;
      if (x2) rows[H + h] = x2 + h * L + j0;
    }
    mix_columns(H, K, wb.data(), rows.data(), c, out + j0, L, std::min(kMixCols, L - j0));
  }
}

void head_gram_image(int64_t H, const float* x, double sx, const float* y, double sy, int64_t L, double* out) {
  std::vector<float> scratch;
  for (int64_t j0 = 0; j0 < L; j0 += kGramCols)
    gram_chunk(H, x + j0, sx, y + j0, sy, L, std::min(kGramCols, L - j0), scratch, out);
}

torch::Tensor mix_heads(const torch::Tensor& w1, const torch::Tensor& x1_in, const torch::Tensor& c,
                        const torch::Tensor& w2, const torch::Tensor& x2_in) {
  check_maps(x1_in, "x1");
  const bool two = x2_in.defined();
  if (two) {
    check_maps(x2_in, "x2");
    check_same(x1_in, x2_in, "x1", "x2");
  }
  const int64_t B = x1_in.size(0), H = x1_in.size(1), L = x1_in.size(2) * x1_in.size(3), K = two ? 2 * H : H;
  TORCH_CHECK(w1.sizes() == torch::IntArrayRef({H, H}) && c.numel() == H && (!two || w2.sizes() == w1.sizes()),
              "head mixing: weights must be [", H, ", ", H, "] and the offset [", H, "] for ", H, " heads, got ",
              w1.sizes(), " and ", c.sizes());
  const torch::Tensor x1 = x1_in.contiguous(), x2 = two ? x2_in.contiguous() : torch::Tensor();
  const torch::Tensor w = (two ? torch::cat({w1, w2}, 1) : w1).to(torch::kFloat).contiguous();
  const torch::Tensor offset = c.to(torch::kFloat).contiguous();
  torch::Tensor out = torch::empty_like(x1);
  const std::vector<float> wb = broadcast_weights(w.data_ptr<float>(), H * K);
  const float *W = wb.data(), *C = offset.data_ptr<float>(), *X1 = x1.data_ptr<float>();
  const float* X2 = two ? x2.data_ptr<float>() : nullptr;
  float* O = out.data_ptr<float>();
  const int64_t chunks = (L + kMixCols - 1) / kMixCols;
  at::parallel_for(0, B * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<const float*> rows(K);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks, j0 = task % chunks * kMixCols;
      for (int64_t h = 0; h < H; ++h) {
        rows[h] = X1 + (b * H + h) * L + j0;
        if (two) rows[H + h] = X2 + (b * H + h) * L + j0;
      }
      mix_columns(H, K, W, rows.data(), C, O + b * H * L + j0, L, std::min(kMixCols, L - j0));
    }
  });
  return out;
}

std::pair<torch::Tensor, torch::Tensor> head_gram(const torch::Tensor& x_in, double sx, const torch::Tensor& y_in,
                                                  double sy) {
  check_maps(x_in, "x");
  check_maps(y_in, "y");
  check_same(x_in, y_in, "x", "y");
  const torch::Tensor x = x_in.contiguous(), y = y_in.contiguous();
  const int64_t B = x.size(0), H = x.size(1), L = x.size(2) * x.size(3);
  const int64_t chunks = (L + kGramCols - 1) / kGramCols, tasks = B * chunks;
  std::vector<double> partial(tasks * (H * H + H));
  const float *X = x.data_ptr<float>(), *Y = y.data_ptr<float>();
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks, j0 = task % chunks * kGramCols;
      gram_chunk(H, X + b * H * L + j0, sx, Y + b * H * L + j0, sy, L, std::min(kGramCols, L - j0), scratch,
                 partial.data() + task * (H * H + H));
    }
  });
  torch::Tensor total = torch::zeros({H * H + H}, torch::kDouble);
  double* T = total.data_ptr<double>();
  for (int64_t task = 0; task < tasks; ++task)
    for (int64_t i = 0; i < H * H + H; ++i) T[i] += partial[task * (H * H + H) + i];
  return {total.slice(0, 0, H * H).view({H, H}), total.slice(0, H * H)};
}

}  // namespace vitlab
