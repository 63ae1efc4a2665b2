#include "models/head_mixing.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <numeric>
#include <vector>

#include "common/simd.h"

namespace vitlab {

namespace {

using simd::kW;
using simd::Lanes;

constexpr int64_t kMixCols = 1024;   // columns of one mixing task
constexpr int64_t kGramCols = 2048;  // columns of one Gram task (one partial sum)

// out[g][j] = c[g] + Σ_k w[g][k] rows[k][j] for j < cols; w is [H, K]
// row-major, rows and out have row stride L. Register tiles of 2 outputs ×
// 32 columns: each load of a row feeds two multiply-adds, each broadcast
// weight four, and the K rows of a tile stay in L1 across the H outputs.
VITLAB_CLONES void mix_columns(int64_t H, int64_t K, const float* w, const float* const* rows, const float* c,
                               float* out, int64_t L, int64_t cols) {
  constexpr int64_t kTile = 4 * kW;
  int64_t j = 0;
  for (; j + kTile <= cols; j += kTile)
    for (int64_t g = 0; g < H; g += 2) {
      const int64_t g1 = std::min(g + 1, H - 1);  // an odd last output is computed twice
      Lanes a[2][4];
#pragma GCC unroll 4
      for (int64_t q = 0; q < 4; ++q) {
        a[0][q] = simd::splat(c[g]);
        a[1][q] = simd::splat(c[g1]);
      }
      for (int64_t k = 0; k < K; ++k) {
        const Lanes w0 = simd::splat(w[g * K + k]), w1 = simd::splat(w[g1 * K + k]);
#pragma GCC unroll 4
        for (int64_t q = 0; q < 4; ++q) {
          const Lanes x = simd::load(rows[k] + j + q * kW);
          a[0][q] += w0 * x;
          a[1][q] += w1 * x;
        }
      }
#pragma GCC unroll 4
      for (int64_t q = 0; q < 4; ++q) {
        simd::store(out + g * L + j + q * kW, a[0][q]);
        simd::store(out + g1 * L + j + q * kW, a[1][q]);
      }
    }
  for (; j + kW <= cols; j += kW)
    for (int64_t g = 0; g < H; ++g) {
      Lanes acc = simd::splat(c[g]);
      for (int64_t k = 0; k < K; ++k) acc += w[g * K + k] * simd::load(rows[k] + j);
      simd::store(out + g * L + j, acc);
    }
  for (; j < cols; ++j)
    for (int64_t g = 0; g < H; ++g) {
      float acc = c[g];
      for (int64_t k = 0; k < K; ++k) acc += w[g * K + k] * rows[k][j];
      out[g * L + j] = acc;
    }
}

VITLAB_LANES void add(float* p, Lanes v) { simd::store(p, simd::load(p) + v); }

// Lanes (g * H + h) of acc += Σ_j (x[g][j] - sx)(y[h][j] - sy) and lanes g of
// sums += Σ_j (x[g][j] - sx), lane by lane, for H rows of x and y (row
// stride L) over cols columns, a multiple of 8. Blocks of kBlockCols columns
// (2H rows of 1 KB stay in L1) in register tiles of 2 × 4 dot products.
VITLAB_CLONES void gram_columns(int64_t H, const float* x, const float* y, int64_t L, int64_t cols, float sx, float sy,
                                float* acc, float* sums) {
  constexpr int64_t kBlockCols = 256;
  const Lanes vx = simd::splat(sx), vy = simd::splat(sy);
  for (int64_t g = 0; g < H; ++g) {
    Lanes s = {};
    for (int64_t j = 0; j < cols; j += kW) s += simd::load(x + g * L + j) - vx;
    add(sums + g * kW, s);
  }
  for (int64_t j0 = 0; j0 < cols; j0 += kBlockCols) {
    const int64_t j1 = std::min(cols, j0 + kBlockCols);
    for (int64_t g = 0; g < H; g += 2)
      for (int64_t h = 0; h < H; h += 4) {
        if (g + 2 > H || h + 4 > H) {  // the edges, one dot product at a time
          for (int64_t gg = g; gg < std::min(g + 2, H); ++gg)
            for (int64_t hh = h; hh < std::min(h + 4, H); ++hh) {
              Lanes t = {};
              for (int64_t j = j0; j < j1; j += kW)
                t += (simd::load(x + gg * L + j) - vx) * (simd::load(y + hh * L + j) - vy);
              add(acc + (gg * H + hh) * kW, t);
            }
          continue;
        }
        Lanes t[2][4] = {};
        for (int64_t j = j0; j < j1; j += kW) {
          const Lanes x0 = simd::load(x + g * L + j) - vx, x1 = simd::load(x + (g + 1) * L + j) - vx;
#pragma GCC unroll 4
          for (int64_t q = 0; q < 4; ++q) {
            const Lanes yq = simd::load(y + (h + q) * L + j) - vy;
            t[0][q] += x0 * yq;
            t[1][q] += x1 * yq;
          }
        }
#pragma GCC unroll 4
        for (int64_t q = 0; q < 4; ++q) {
          add(acc + (g * H + h + q) * kW, t[0][q]);
          add(acc + ((g + 1) * H + h + q) * kW, t[1][q]);
        }
      }
  }
}

// Adds Σ (x_g - sx)(y_h - sy) to out[g * H + h] and Σ (x_g - sx) to
// out[H * H + g] (float64) over cols columns of H rows (row stride L);
// acc and sums are float scratch.
void gram_chunk(int64_t H, const float* x, double sx, const float* y, double sy, int64_t L, int64_t cols,
                std::vector<float>& acc, std::vector<float>& sums, double* out) {
  const int64_t lanes = cols / kW * kW;
  acc.assign(static_cast<size_t>(H * H * kW), 0.0f);
  sums.assign(static_cast<size_t>(H * kW), 0.0f);
  gram_columns(H, x, y, L, lanes, static_cast<float>(sx), static_cast<float>(sy), acc.data(), sums.data());
  for (int64_t i = 0; i < H * H; ++i) out[i] += std::accumulate(&acc[i * kW], &acc[i * kW] + kW, 0.0);
  for (int64_t g = 0; g < H; ++g) out[H * H + g] += std::accumulate(&sums[g * kW], &sums[g * kW] + kW, 0.0);
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
  std::vector<const float*> rows(K);
  for (int64_t j0 = 0; j0 < L; j0 += kMixCols) {
    for (int64_t h = 0; h < H; ++h) {
      rows[h] = x1 + h * L + j0;
      if (x2) rows[H + h] = x2 + h * L + j0;
    }
    mix_columns(H, K, w, rows.data(), c, out + j0, L, std::min(kMixCols, L - j0));
  }
}

void head_gram_image(int64_t H, const float* x, double sx, const float* y, double sy, int64_t L, double* out) {
  std::vector<float> acc, sums;
  for (int64_t j0 = 0; j0 < L; j0 += kGramCols)
    gram_chunk(H, x + j0, sx, y + j0, sy, L, std::min(kGramCols, L - j0), acc, sums, out);
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
  const float *W = w.data_ptr<float>(), *C = offset.data_ptr<float>(), *X1 = x1.data_ptr<float>();
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
    std::vector<float> acc, sums;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks, j0 = task % chunks * kGramCols;
      gram_chunk(H, X + b * H * L + j0, sx, Y + b * H * L + j0, sy, L, std::min(kGramCols, L - j0), acc, sums,
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
