#include <ATen/Parallel.h>

#include <catch2/catch.hpp>
#include <cmath>
#include <limits>

#include "kernels/attention.h"
#include "kernels/simd.h"
#include "tests/helpers.h"

using namespace vitlab;
using vitlab::test::max_abs_diff;

namespace {

struct Heads {
  torch::Tensor qkv, q, k, v;
};

// q, k, v as the strided head views of a qkv projection [B, N, 3, H, d],
// as in the model.
Heads views(const torch::Tensor& qkv) {
  torch::Tensor t = qkv.permute({2, 0, 3, 1, 4});
  return {qkv, t[0], t[1], t[2]};
}

Heads heads(int64_t B, int64_t H, int64_t N, int64_t d) {
  return views(torch::randn({B, N, 3, H, d}).requires_grad_(true));
}

}  // namespace

TEST_CASE("the CPU attention kernel matches softmax(q k^T) v and its gradients") {
  torch::manual_seed(0);
  for (const auto& [N, d] : std::vector<std::pair<int64_t, int64_t>>{{1, 4}, {5, 7}, {17, 16}, {50, 16}, {65, 33}}) {
    INFO("N = " << N << ", d = " << d);
    const double scale = 1.0 / std::sqrt(static_cast<double>(d));
    Heads a = heads(2, 3, N, d);
    Heads b = views(a.qkv.detach().clone().requires_grad_(true));
    REQUIRE(attention_kernel_applies(a.q, a.k, a.v));

    const torch::Tensor p = attention_probs(a.q, a.k, scale);
    const torch::Tensor out = attention_apply(p, a.v);
    const torch::Tensor p_ref = torch::matmul(b.q * scale, b.k.transpose(-2, -1)).softmax(-1);
    const torch::Tensor out_ref = torch::matmul(p_ref, b.v);
    CHECK(max_abs_diff(p, p_ref) < 1e-6);
    CHECK(max_abs_diff(out, out_ref) < 1e-5);
    CHECK(out.sizes() == out_ref.sizes());
    // Merging the heads back is a view, as the projection reads them.
    CHECK(out.transpose(1, 2).is_contiguous());

    // Through both functions, with a gradient on the probabilities too.
    const torch::Tensor g = torch::randn_like(out_ref), gp = torch::randn_like(p_ref);
    ((out * g).sum() + (p * gp).sum()).backward();
    ((out_ref * g).sum() + (p_ref * gp).sum()).backward();
    CHECK(max_abs_diff(a.qkv.grad(), b.qkv.grad()) < 1e-5);
  }
}

TEST_CASE("the CPU attention kernel gives the same bits with 1 and 2 threads") {
  torch::manual_seed(1);
  Heads a = heads(3, 4, 37, 16);
  const int threads = at::get_num_threads();
  auto run = [&](int n) {
    at::set_num_threads(n);
    a.qkv.mutable_grad() = torch::Tensor();
    torch::Tensor out = attention_apply(attention_probs(a.q, a.k, 0.25), a.v);
    out.square().sum().backward();
    return std::make_pair(out.detach(), a.qkv.grad().clone());
  };
  const auto one = run(1), two = run(2);
  at::set_num_threads(threads);
  CHECK(torch::equal(one.first, two.first));
  CHECK(torch::equal(one.second, two.second));
}

TEST_CASE("the CPU attention kernel passes NaN through and rejects bad shapes") {
  Heads a = heads(1, 2, 6, 8);
  torch::Tensor q = a.q.detach().clone();
  q[0][1][2][3] = std::numeric_limits<float>::quiet_NaN();
  const torch::Tensor p = attention_probs(q, a.k.detach(), 0.5);
  CHECK(torch::isnan(p[0][1][2]).all().item<bool>());
  CHECK(torch::isfinite(p[0][0]).all().item<bool>());
  CHECK_THROWS_WITH(attention_probs(q[0], a.k[0], 0.5), Catch::Contains("must be [B, H, N, d]"));
  CHECK_THROWS_WITH(attention_apply(p.narrow(3, 0, 5), a.v), Catch::Contains("expected [1, 2, 6, 6]"));
  CHECK_FALSE(attention_kernel_applies(a.q.to(torch::kDouble), a.k, a.v));
}

TEST_CASE("simd::exp is within 2 ulp of std::exp and flushes to 0 below -88") {
  double worst = 0;
  for (float x = -87.0f; x < 88.0f; x += 0.0137f) {
    float in[simd::kW], out[simd::kW];
    for (int64_t w = 0; w < simd::kW; ++w) in[w] = x + 0.001f * static_cast<float>(w);
    simd::store(out, simd::exp(simd::load(in)));
    for (int64_t w = 0; w < simd::kW; ++w) {
      const double ref = std::exp(static_cast<double>(in[w]));
      worst = std::max(worst, std::abs(out[w] - ref) / ref);
    }
  }
  CHECK(worst < 2.5e-7);  // 2 ulp of float is 2.4e-7 relative at worst
  float in[simd::kW] = {-1e30f, -100.0f, -89.0f, 0.0f, 1.0f, -std::numeric_limits<float>::infinity(), 0.5f, 2.0f};
  float out[simd::kW];
  simd::store(out, simd::exp(simd::load(in)));
  CHECK(out[0] == 0.0f);
  CHECK(out[1] == 0.0f);
  CHECK(out[3] == 1.0f);
  CHECK(out[5] == 0.0f);
  CHECK(std::abs(out[4] - std::exp(1.0f)) < 1e-6f);
}

TEST_CASE("simd::xlogx is x ln x within 3e-7 of its scale, and 0 at 0, below the normals and below 0") {
  double worst = 0;
  for (double x = 1e-30; x < 4.0; x *= 1.0137) {
    float in[simd::kW], out[simd::kW];
    for (int64_t w = 0; w < simd::kW; ++w) in[w] = static_cast<float>(x * (1.0 + 0.001 * static_cast<double>(w)));
    simd::store(out, simd::xlogx(simd::load(in)));
    for (int64_t w = 0; w < simd::kW; ++w) {
      const double v = in[w], ref = v * std::log(v);
      // Relative to x (1 + |ln x|): near x = 1, x ln x passes through 0.
      worst = std::max(worst, std::abs(out[w] - ref) / (v * (1.0 + std::abs(std::log(v)))));
    }
  }
  CHECK(worst < 3e-7);
  float in[simd::kW] = {0.0f, 1e-40f, -0.5f, 1.0f, 0.5f, 1.0f / 197, std::numeric_limits<float>::min(), 2.0f};
  float out[simd::kW];
  simd::store(out, simd::xlogx(simd::load(in)));
  CHECK(out[0] == 0.0f);
  CHECK(out[1] == 0.0f);  // a denormal
  CHECK(out[2] == 0.0f);
  CHECK(out[3] == 0.0f);
  CHECK(out[4] == Approx(0.5 * std::log(0.5)).epsilon(1e-6));
  CHECK(out[5] == Approx(std::log(1.0 / 197) / 197).epsilon(1e-6));
}
