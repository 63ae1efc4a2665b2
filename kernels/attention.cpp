#include "kernels/attention.h"

#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "common/runtime.h"
#include "kernels/head_mixing.h"
#include "kernels/simd.h"

namespace vitlab {

namespace {

using simd::kW;
using simd::Lanes;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr int64_t kRows = 4, kCols = 2 * kW;  // small_gemm's register tile

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// One matrix of a strided tensor: element (i, j) at data[i * rs + j * cs].
struct Matrix {
  const float* data;
  int64_t rs, cs;
};

// Per-thread scratch for N tokens and head size d: small_gemm's packed B
// and staged operand, a block of rows, and a map for the functions that
// keep it out of memory (sized by them).
struct Scratch {
  int64_t N, d;
  std::vector<float> b, stage, rows, map;
  Scratch(int64_t N, int64_t d) : N(N), d(d) {
    const int64_t n = std::max(N, d);
    b.resize(n * round_up(n, kCols));
    stage.resize(n * n);
    rows.resize(N * round_up(N, kCols));
  }
};

// C = alpha * A B for A m x k and B k x n; C row-major with row stride ldc.
// B is packed as [k][n rounded up to 16] (zero-padded), A read in place, and
// the product taken in 4 x 16 register tiles.
VITLAB_CLONES void small_gemm(int64_t m, int64_t n, int64_t k, Matrix A, Matrix B, float alpha, float* C, int64_t ldc,
                              Scratch& scratch) {
  const int64_t ldb = round_up(n, kCols);
  float* b_pack = scratch.b.data();
  if (B.cs == 1) {
    for (int64_t p = 0; p < k; ++p) std::copy(B.data + p * B.rs, B.data + p * B.rs + n, b_pack + p * ldb);
  } else if (B.rs == 1) {  // B^T's rows: staged contiguously, then transposed
    float* stage = scratch.stage.data();
    for (int64_t j = 0; j < n; ++j) std::copy(B.data + j * B.cs, B.data + j * B.cs + k, stage + j * k);
    for (int64_t j = 0; j < n; ++j)
      for (int64_t p = 0; p < k; ++p) b_pack[p * ldb + j] = stage[j * k + p];
  } else {
    for (int64_t p = 0; p < k; ++p)
      for (int64_t j = 0; j < n; ++j) b_pack[p * ldb + j] = B.data[p * B.rs + j * B.cs];
  }
  for (int64_t p = 0; p < k; ++p) std::fill(b_pack + p * ldb + n, b_pack + (p + 1) * ldb, 0.0f);

  // B is packed by now, so its staging area is free for A.
  if (A.cs == 1 && A.rs != k) {  // rows far apart (a qkv view) share few cache sets: compact them first
    float* stage = scratch.stage.data();
    for (int64_t i = 0; i < m; ++i) std::copy(A.data + i * A.rs, A.data + i * A.rs + k, stage + i * k);
    A = {stage, k, 1};
  }
  for (int64_t i0 = 0; i0 < m; i0 += kRows) {
    // Rows past m repeat row m - 1; their results are dropped.
    const float* a[kRows];
    for (int64_t r = 0; r < kRows; ++r) a[r] = A.data + std::min(i0 + r, m - 1) * A.rs;
    for (int64_t j0 = 0; j0 < n; j0 += kCols) {
      Lanes c[kRows][2] = {};
      const float* b = b_pack + j0;
      for (int64_t p = 0; p < k; ++p) {
        const Lanes b0 = simd::load(b + p * ldb), b1 = simd::load(b + p * ldb + kW);
#pragma GCC unroll 4
        for (int64_t r = 0; r < kRows; ++r) {
          const float x = a[r][p * A.cs];
          c[r][0] += x * b0;
          c[r][1] += x * b1;
        }
      }
      // Unrolled, full-width stores where the tile fits: any indexing of
      // the tile by a runtime value would move it from registers to memory.
      const int64_t cols = std::min(kCols, n - j0);
#pragma GCC unroll 4
      for (int64_t r = 0; r < kRows; ++r) {
        if (i0 + r >= m) break;
        float* dst = C + (i0 + r) * ldc + j0;
        const Lanes lo = c[r][0] * alpha, hi = c[r][1] * alpha;
        if (cols == kCols) {
          simd::store(dst, lo);
          simd::store(dst + kW, hi);
        } else {
          for (int64_t w = 0; w < cols; ++w) dst[w] = w < kW ? lo[w] : hi[w - kW];
        }
      }
    }
  }
}

// p = softmax of each of the m rows of s (n values, row stride lds, room for
// n rounded up to 8, which this overwrites) into p (row stride n).
VITLAB_CLONES void softmax_rows(float* s, int64_t m, int64_t n, int64_t lds, float* p) {
  const int64_t last = round_up(n, kW) - kW;  // the last group of 8, partly past n
  const simd::IntLanes lane = {0, 1, 2, 3, 4, 5, 6, 7};
  const auto in_row = lane < static_cast<int32_t>(n - last);
  const Lanes minus_inf = simd::splat(-std::numeric_limits<float>::infinity());
  for (int64_t i = 0; i < m; ++i) {
    float* row = s + i * lds;
    const Lanes tail = in_row ? simd::load(row + last) : minus_inf;  // exp gives 0 past n
    Lanes top = tail;
    for (int64_t j = 0; j < last; j += kW) {
      const Lanes x = simd::load(row + j);
      top = x > top ? x : top;
    }
    const float max = simd::max(top);
    Lanes total = simd::exp(tail - max);
    simd::store(row + last, total);
    for (int64_t j = 0; j < last; j += kW) {
      const Lanes e = simd::exp(simd::load(row + j) - max);
      simd::store(row + j, e);
      total += e;
    }
    const float inv = 1.0f / simd::sum(total);
    for (int64_t j = 0; j < n; ++j) p[i * n + j] = row[j] * inv;
  }
}

// ds = p * (dp - rowsum(dp * p)), the gradient of the softmax input, for m
// rows of n (all row-major with row stride n).
VITLAB_CLONES void softmax_backward_rows(const float* p, const float* dp, float* ds, int64_t m, int64_t n) {
  for (int64_t i = 0; i < m; ++i) {
    const float *pr = p + i * n, *dpr = dp + i * n;
    Lanes acc = {};
    int64_t j = 0;
    for (; j + kW <= n; j += kW) acc += simd::load(pr + j) * simd::load(dpr + j);
    float dot = simd::sum(acc);
    for (; j < n; ++j) dot += pr[j] * dpr[j];
    for (j = 0; j < n; ++j) ds[i * n + j] = pr[j] * (dpr[j] - dot);
  }
}

// The (batch, head) matrices of a [B, H, N, d] tensor with unit stride in d.
struct Heads {
  const float* data;
  int64_t H, sb, sh, sn;
  explicit Heads(const torch::Tensor& t)
      : data(t.data_ptr<float>()), H(t.size(1)), sb(t.stride(0)), sh(t.stride(1)), sn(t.stride(2)) {}
  Matrix at(int64_t bh) const { return {data + bh / H * sb + bh % H * sh, sn, 1}; }
  Matrix transposed(int64_t bh) const { return {data + bh / H * sb + bh % H * sh, 1, sn}; }
};

// The attention product of one (batch, head) pair bh: its N x N map p
// times its v, into out [B, N, H, d] (heads merged).
void apply_head(const float* p, const Heads& V, int64_t bh, float* out, Scratch& s) {
  const int64_t N = s.N, d = s.d, H = V.H;
  small_gemm(N, d, N, {p, N, 1}, V.at(bh), 1.0f, out + (bh / H * N * H + bh % H) * d, H * d, s);
}

// Its backward for dout [B, N, H, d]: dp = dout_bh v_bhᵀ, dv = pᵀ dout_bh.
void apply_head_backward(const float* p, const Heads& V, int64_t bh, const float* dout, float* dp, float* dv,
                         Scratch& s) {
  const int64_t N = s.N, d = s.d, H = V.H;
  const Matrix dO_bh = {dout + (bh / H * N * H + bh % H) * d, H * d, 1};
  small_gemm(N, N, d, dO_bh, V.transposed(bh), 1.0f, dp, N, s);
  small_gemm(N, d, N, {p, 1, N}, dO_bh, 1.0f, dv, d, s);
}

torch::Tensor unit_inner_stride(const torch::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// Runs fn(bh, scratch) for every (batch, head) pair, in parallel.
template <typename Fn>
void for_each_head(int64_t BH, int64_t N, int64_t d, const Fn& fn) {
  at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t end) {
    Scratch scratch(N, d);
    for (int64_t bh = begin; bh < end; ++bh) fn(bh, scratch);
  });
}

}  // namespace

torch::Tensor attention_probs_forward(const torch::Tensor& q_in, const torch::Tensor& k_in, double scale) {
  const torch::Tensor q = unit_inner_stride(q_in), k = unit_inner_stride(k_in);
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), d = q.size(3);
  torch::Tensor p = torch::empty({B, H, N, N}, q.options());
  const Heads Q(q), K(k);
  float* P = p.data_ptr<float>();
  for_each_head(B * H, N, d, [&](int64_t bh, Scratch& s) {
    const int64_t lds = round_up(N, kCols);
    small_gemm(N, N, d, Q.at(bh), K.transposed(bh), static_cast<float>(scale), s.rows.data(), lds, s);
    softmax_rows(s.rows.data(), N, N, lds, P + bh * N * N);
  });
  return p;
}

namespace {

// The backward of one (batch, head) pair bh of attention_probs_forward:
// from its map p and the map's gradient dp, its rows of dq and dk.
void probs_head_backward(const float* p, const float* dp, const Heads& Q, const Heads& K, int64_t bh, float scale,
                         float* dQ, float* dK, Scratch& s) {
  const int64_t N = s.N, d = s.d;
  float* ds = s.rows.data();
  softmax_backward_rows(p, dp, ds, N, N);
  small_gemm(N, d, N, {ds, N, 1}, K.at(bh), scale, dQ + bh * N * d, d, s);
  small_gemm(N, d, N, {ds, 1, N}, Q.at(bh), scale, dK + bh * N * d, d, s);
}

struct ProbsFunction : torch::autograd::Function<ProbsFunction> {
  static torch::Tensor forward(AutogradContext* ctx, torch::Tensor q, torch::Tensor k, double scale) {
    RECORD_USER_SCOPE("vitlab::attention_probs");  // named in profiles; backward nodes are by their type
    q = unit_inner_stride(q);
    k = unit_inner_stride(k);
    torch::Tensor p = attention_probs_forward(q, k, scale);
    ctx->save_for_backward({q, k, p});
    ctx->saved_data["scale"] = scale;
    return p;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const torch::Tensor &q = saved[0], &k = saved[1], &p = saved[2];
    const torch::Tensor dp = grads[0].contiguous();
    const float scale = static_cast<float>(ctx->saved_data["scale"].toDouble());
    const int64_t B = q.size(0), H = q.size(1), N = q.size(2), d = q.size(3);
    torch::Tensor dq = torch::empty({B, H, N, d}, q.options()), dk = torch::empty({B, H, N, d}, q.options());
    const Heads Q(q), K(k);
    const float *P = p.data_ptr<float>(), *dP = dp.data_ptr<float>();
    float *dQ = dq.data_ptr<float>(), *dK = dk.data_ptr<float>();
    for_each_head(B * H, N, d, [&](int64_t bh, Scratch& s) {
      probs_head_backward(P + bh * N * N, dP + bh * N * N, Q, K, bh, scale, dQ, dK, s);
    });
    return {dq, dk, torch::Tensor()};
  }
};

struct ApplyFunction : torch::autograd::Function<ApplyFunction> {
  // Returns [B, N, H, d]: the heads already in token-major order.
  static torch::Tensor forward(AutogradContext* ctx, torch::Tensor p, torch::Tensor v) {
    RECORD_USER_SCOPE("vitlab::attention_apply");
    p = p.contiguous();
    v = unit_inner_stride(v);
    const int64_t B = v.size(0), H = v.size(1), N = v.size(2), d = v.size(3);
    torch::Tensor out = torch::empty({B, N, H, d}, v.options());
    const Heads V(v);
    const float* P = p.data_ptr<float>();
    float* O = out.data_ptr<float>();
    for_each_head(B * H, N, d, [&](int64_t bh, Scratch& s) { apply_head(P + bh * N * N, V, bh, O, s); });
    ctx->save_for_backward({p, v});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const torch::Tensor &p = saved[0], &v = saved[1];
    const torch::Tensor dout = grads[0].contiguous();
    const int64_t B = v.size(0), H = v.size(1), N = v.size(2), d = v.size(3);
    torch::Tensor dp = torch::empty({B, H, N, N}, v.options()), dv = torch::empty({B, H, N, d}, v.options());
    const Heads V(v);
    const float *P = p.data_ptr<float>(), *dO = dout.data_ptr<float>();
    float *dP = dp.data_ptr<float>(), *dV = dv.data_ptr<float>();
    for_each_head(B * H, N, d, [&](int64_t bh, Scratch& s) {
      apply_head_backward(P + bh * N * N, V, bh, dO, dP + bh * N * N, dV + bh * N * d, s);
    });
    return {dp, dv};
  }
};

void check_heads(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4, "attention kernel: ", name, " must be [B, H, N, d], got ", t.sizes());
}

}  // namespace

bool attention_kernel_applies(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v) {
  if (!cpu_kernels_enabled()) return false;
  for (const torch::Tensor* t : {&q, &k, &v})
    if (!t->device().is_cpu() || t->scalar_type() != torch::kFloat) return false;
  return true;
}

torch::Tensor attention_probs(const torch::Tensor& q, const torch::Tensor& k, double scale) {
  check_heads(q, "q");
  check_heads(k, "k");
  TORCH_CHECK(q.sizes() == k.sizes(), "attention kernel: q ", q.sizes(), " and k ", k.sizes(), " must match");
  return ProbsFunction::apply(q, k, scale);
}

torch::Tensor attention_apply(const torch::Tensor& p, const torch::Tensor& v) {
  check_heads(p, "p");
  check_heads(v, "v");
  const int64_t B = v.size(0), H = v.size(1), N = v.size(2);
  TORCH_CHECK(p.sizes() == torch::IntArrayRef({B, H, N, N}), "attention kernel: p is ", p.sizes(), ", expected [", B,
              ", ", H, ", ", N, ", ", N, "] for v ", v.sizes());
  return ApplyFunction::apply(p, v).permute({0, 2, 1, 3});
}

torch::Tensor attention_inference(const torch::Tensor& q_in, const torch::Tensor& k_in, const torch::Tensor& v_in,
                                  double scale, AttentionMapSink* sink) {
  RECORD_USER_SCOPE("vitlab::attention_inference");
  check_heads(q_in, "q");
  check_heads(k_in, "k");
  check_heads(v_in, "v");
  TORCH_CHECK(q_in.sizes() == k_in.sizes() && q_in.sizes() == v_in.sizes(), "attention kernel: q ", q_in.sizes(),
              ", k ", k_in.sizes(), " and v ", v_in.sizes(), " must match");
  const torch::Tensor q = unit_inner_stride(q_in), k = unit_inner_stride(k_in), v = unit_inner_stride(v_in);
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), d = q.size(3), NN = N * N;
  torch::Tensor out = torch::empty({B, N, H, d}, v.options());
  if (sink) sink->begin(B, H, N);
  const Heads Q(q), K(k), V(v);
  float* O = out.data_ptr<float>();
  for_each_head(B * H, N, d, [&](int64_t bh, Scratch& s) {
    const int64_t lds = round_up(N, kCols);
    s.map.resize(NN);
    small_gemm(N, N, d, Q.at(bh), K.transposed(bh), static_cast<float>(scale), s.rows.data(), lds, s);
    softmax_rows(s.rows.data(), N, N, lds, s.map.data());
    if (sink) sink->write(bh / H, bh % H, s.map.data());
    apply_head(s.map.data(), V, bh, O, s);
  });
  return out.permute({0, 2, 1, 3});
}

namespace {

struct MixedMaps {
  torch::Tensor a, v, w, c;
  int64_t B, H, N, d;
};

MixedMaps check_mixed(const torch::Tensor& w, const torch::Tensor& c, const torch::Tensor& a, const torch::Tensor& v) {
  check_heads(a, "a");
  check_heads(v, "v");
  const int64_t B = v.size(0), H = v.size(1), N = v.size(2);
  TORCH_CHECK(a.sizes() == torch::IntArrayRef({B, H, N, N}), "attention kernel: the maps are ", a.sizes(),
              ", expected [", B, ", ", H, ", ", N, ", ", N, "] for v ", v.sizes());
  TORCH_CHECK(w.sizes() == torch::IntArrayRef({H, H}) && c.numel() == H, "attention kernel: the mixing must be [", H,
              ", ", H, "] and its offset [", H, "], got ", w.sizes(), " and ", c.sizes());
  return {
      a.contiguous(), unit_inner_stride(v), w.to(torch::kFloat).contiguous(), c.to(torch::kFloat).contiguous(), B, H, N,
      v.size(3)};
}

// Runs fn(b, y, scratch) for every image b < B, in parallel, with y =
// w [x1[b]; x2[b]] + c (x2 may be null; w [H, H] or [H, 2H]) in per-thread
// memory ([H, N, N], a few MB: in cache).
template <typename Fn>
void for_each_mixed_image(const torch::Tensor& w, const torch::Tensor& c, const float* x1, const float* x2, int64_t B,
                          int64_t H, int64_t N, int64_t d, const Fn& fn) {
  const float *W = w.data_ptr<float>(), *C = c.data_ptr<float>();
  const int64_t NN = N * N;
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    Scratch scratch(N, d);
    const std::unique_ptr<float[]> y(new float[H * NN]);  // not zeroed (a vector would be): mix_image writes it all
    for (int64_t b = begin; b < end; ++b) {
      mix_image(H, W, x1 + b * H * NN, x2 ? x2 + b * H * NN : nullptr, C, y.get(), NN);
      fn(b, y.get(), scratch);
    }
  });
}

}  // namespace

torch::Tensor mixed_attention_apply(const torch::Tensor& w, const torch::Tensor& c, const torch::Tensor& a,
                                    const torch::Tensor& v, AttentionMapSink* sink) {
  RECORD_USER_SCOPE("vitlab::mixed_attention_apply");
  const MixedMaps m = check_mixed(w, c, a, v);
  torch::Tensor out = torch::empty({m.B, m.N, m.H, m.d}, m.v.options());
  const Heads V(m.v);
  float* O = out.data_ptr<float>();
  if (sink) sink->begin(m.B, m.H, m.N);
  for_each_mixed_image(m.w, m.c, m.a.data_ptr<float>(), nullptr, m.B, m.H, m.N, m.d,
                       [&](int64_t b, const float* y, Scratch& s) {
                         for (int64_t h = 0; h < m.H; ++h) {
                           const float* map = y + h * m.N * m.N;
                           if (sink) sink->write(b, h, map);
                           apply_head(map, V, b * m.H + h, O, s);
                         }
                       });
  return out;
}

MixedApplyGrads mixed_attention_apply_backward(const torch::Tensor& w, const torch::Tensor& c, const torch::Tensor& a,
                                               const torch::Tensor& v, const torch::Tensor& dout, double shift) {
  RECORD_USER_SCOPE("vitlab::mixed_attention_apply_backward");
  const MixedMaps m = check_mixed(w, c, a, v);
  const int64_t B = m.B, H = m.H, N = m.N, d = m.d, NN = N * N;
  TORCH_CHECK(dout.sizes() == torch::IntArrayRef({B, N, H, d}), "attention kernel: the output gradient is ",
              dout.sizes(), ", expected [", B, ", ", N, ", ", H, ", ", d, "]");
  const torch::Tensor dO = dout.contiguous();
  torch::Tensor dy = torch::empty({B, H, N, N}, m.a.options()), dv = torch::empty({B, H, N, d}, m.v.options());
  std::vector<double> partial(static_cast<size_t>(B * (H * H + H)), 0.0);
  const Heads V(m.v);
  const float *A = m.a.data_ptr<float>(), *dO_data = dO.data_ptr<float>();
  float *dY = dy.data_ptr<float>(), *dV = dv.data_ptr<float>();
  for_each_mixed_image(m.w, m.c, A, nullptr, B, H, N, d, [&](int64_t b, const float* y, Scratch& s) {
    for (int64_t h = 0; h < H; ++h) {
      const int64_t bh = b * H + h;
      apply_head_backward(y + h * NN, V, bh, dO_data, dY + bh * NN, dV + bh * N * d, s);
    }
    // While this image's dy and a are in cache.
    head_gram_image(H, dY + b * H * NN, 0.0, A + b * H * NN, shift, NN, partial.data() + b * (H * H + H));
  });
  torch::Tensor total = torch::zeros({H * H + H}, torch::kDouble);  // images added in order: deterministic
  double* T = total.data_ptr<double>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < H * H + H; ++i) T[i] += partial[b * (H * H + H) + i];
  return {dy, dv, total.slice(0, 0, H * H).view({H, H}), total.slice(0, H * H)};
}

std::pair<torch::Tensor, torch::Tensor> attention_probs_backward_mixed(
    const torch::Tensor& q_in, const torch::Tensor& k_in, const torch::Tensor& p, double scale, const torch::Tensor& w1,
    const torch::Tensor& x1, const torch::Tensor& w2, const torch::Tensor& x2, const torch::Tensor& c) {
  RECORD_USER_SCOPE("vitlab::attention_probs_backward_mixed");
  const torch::Tensor q = unit_inner_stride(q_in), k = unit_inner_stride(k_in);
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), d = q.size(3), NN = N * N;
  for (const torch::Tensor* t : {&p, &x1, &x2})
    TORCH_CHECK(t->sizes() == torch::IntArrayRef({B, H, N, N}) && t->is_contiguous(), "attention kernel: maps ",
                t->sizes(), " must be contiguous [", B, ", ", H, ", ", N, ", ", N, "] for q ", q.sizes());
  const torch::Tensor w = torch::cat({w1, w2}, 1).to(torch::kFloat).contiguous(), offset = c.to(torch::kFloat);
  TORCH_CHECK(w.sizes() == torch::IntArrayRef({H, 2 * H}) && offset.numel() == H,
              "attention kernel: the mixings must be [", H, ", ", H, "] and the offset [", H, "]");
  torch::Tensor dq = torch::empty({B, H, N, d}, q.options()), dk = torch::empty({B, H, N, d}, q.options());
  const Heads Q(q), K(k);
  const float* P = p.data_ptr<float>();
  float *dQ = dq.data_ptr<float>(), *dK = dk.data_ptr<float>();
  const auto scale_f = static_cast<float>(scale);
  for_each_mixed_image(w, offset.contiguous(), x1.data_ptr<float>(), x2.data_ptr<float>(), B, H, N, d,
                       [&](int64_t b, const float* dp, Scratch& s) {
                         for (int64_t h = 0; h < H; ++h)
                           probs_head_backward(P + (b * H + h) * NN, dp + h * NN, Q, K, b * H + h, scale_f, dQ, dK, s);
                       });
  return {dq, dk};
}

}  // namespace vitlab
