#include <catch2/catch.hpp>
#include <cmath>
#include <vector>

#include "analysis/bootstrap.h"
#include "analysis/measures.h"
#include "analysis/similarity.h"
#include "tests/helpers.h"

using namespace vitlab;
using vitlab::test::max_abs_diff;

namespace {

// Softmax maps [B, H, T, T] and block outputs [B, T, D] of L blocks.
struct Inputs {
  std::vector<torch::Tensor> maps, features;
};

Inputs random_inputs(int64_t L, int64_t B, int64_t H, int64_t T, int64_t D) {
  Inputs in;
  for (int64_t l = 0; l < L; ++l) {
    in.maps.push_back(torch::softmax(2 * torch::randn({B, H, T, T}), -1));
    // A shared component makes the blocks' outputs related, as a residual stream does.
    in.features.push_back(torch::randn({B, T, D}) + 0.5 * static_cast<double>(l) * torch::ones({1, T, D}));
  }
  return in;
}

MeasureOptions options(int64_t prefix, int64_t cka_batch = 4) {
  MeasureOptions o;
  o.prefix_tokens = prefix;
  o.patch_size = 16;
  o.cka_batch = cka_batch;
  return o;
}

// Everything of `in`, fed in batches of the given sizes.
MeasureResult measure(const Inputs& in, const MeasureOptions& o, const std::vector<int64_t>& splits) {
  const int64_t L = static_cast<int64_t>(in.maps.size()), H = in.maps[0].size(1), T = in.maps[0].size(2);
  MeasureAccumulator acc(L, H, T, o);
  int64_t start = 0;
  for (const int64_t n : splits) {
    std::vector<torch::Tensor> features;
    for (int64_t l = 0; l < L; ++l) {
      acc.add_maps(l, in.maps[l].narrow(0, start, n));
      features.push_back(in.features[l].narrow(0, start, n));
    }
    acc.add_features(features);
    acc.end_batch(n);
    start += n;
  }
  return acc.result();
}

// The formulas of docs/ANALYSIS.md, written out in float64 loops.
double entropy_ref(const torch::Tensor& maps, int64_t h) {
  const auto a = maps.to(torch::kDouble).contiguous();
  const auto acc = a.accessor<double, 4>();
  double sum = 0;
  for (int64_t b = 0; b < a.size(0); ++b)
    for (int64_t i = 0; i < a.size(2); ++i)
      for (int64_t j = 0; j < a.size(3); ++j) {
        const double p = acc[b][h][i][j];
        if (p > 0) sum -= p * std::log(p);
      }
  return sum / static_cast<double>(a.size(0) * a.size(2));
}

double distance_ref(const torch::Tensor& maps, int64_t h, int64_t prefix, int64_t patch) {
  const auto a = maps.to(torch::kDouble).contiguous();
  const auto acc = a.accessor<double, 4>();
  const int64_t n = a.size(2) - prefix, g = static_cast<int64_t>(std::lround(std::sqrt(n)));
  double sum = 0;
  for (int64_t b = 0; b < a.size(0); ++b)
    for (int64_t i = 0; i < n; ++i) {
      double row = 0, weighted = 0;
      for (int64_t j = 0; j < n; ++j) {
        const double p = acc[b][h][prefix + i][prefix + j];
        const double dy = static_cast<double>(i / g - j / g), dx = static_cast<double>(i % g - j % g);
        row += p;
        weighted += p * patch * std::sqrt(dy * dy + dx * dx);
      }
      sum += weighted / row;
    }
  return sum / static_cast<double>(a.size(0) * n);
}

double uniformity_ref(const torch::Tensor& features, int64_t prefix) {
  const auto x = features.to(torch::kDouble);
  const int64_t n = x.size(1) - prefix;
  double sum = 0;
  for (int64_t b = 0; b < x.size(0); ++b) {
    double image = 0;
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j)
        if (i != j) {
          const auto u = x[b][prefix + i], v = x[b][prefix + j];
          image += std::abs((u.dot(v) / (u.norm() * v.norm())).item<double>());
        }
    sum += image / static_cast<double>(n * (n - 1));
  }
  return sum / static_cast<double>(x.size(0));
}

double residual_ref(const torch::Tensor& features) {
  const auto x = features.to(torch::kDouble);
  double sum = 0;
  for (int64_t b = 0; b < x.size(0); ++b) sum += ((x[b] - x[b].mean(0, true)).norm() / x[b].norm()).item<double>();
  return sum / static_cast<double>(x.size(0));
}

double effective_rank_ref(const torch::Tensor& features) {
  const auto x = features.to(torch::kDouble);
  double sum = 0;
  for (int64_t b = 0; b < x.size(0); ++b) {
    const auto s = torch::linalg_svdvals(x[b]);
    const auto p = s / s.sum();
    sum += std::exp(-(p * torch::log(p.clamp_min(1e-300))).sum().item<double>());
  }
  return sum / static_cast<double>(x.size(0));
}

// Unbiased HSIC of two Gram matrices, term by term (Song et al. 2012).
double hsic_ref(const torch::Tensor& k_in, const torch::Tensor& l_in) {
  const int64_t n = k_in.size(0);
  const auto k = k_in - torch::diag(torch::diag(k_in)), l = l_in - torch::diag(torch::diag(l_in));
  const auto one = torch::ones({n, 1}, torch::kDouble);
  const double nd = static_cast<double>(n);
  const double trace = torch::trace(k.mm(l)).item<double>();
  const double middle = (one.t().mm(k).mm(one) * one.t().mm(l).mm(one)).item<double>() / ((nd - 1) * (nd - 2));
  const double last = 2.0 / (nd - 2) * one.t().mm(k).mm(l).mm(one).item<double>();
  return (trace + middle - last) / (nd * (nd - 3));
}

double cka_ref(const torch::Tensor& fp, const torch::Tensor& fq, int64_t batch) {
  double pq = 0, pp = 0, qq = 0;
  for (int64_t start = 0; start + 4 <= fp.size(0); start += batch) {
    const int64_t n = std::min(batch, fp.size(0) - start);
    const auto x = fp.narrow(0, start, n).reshape({n, -1}).to(torch::kDouble);
    const auto y = fq.narrow(0, start, n).reshape({n, -1}).to(torch::kDouble);
    const auto kx = x.mm(x.t()), ky = y.mm(y.t());
    pq += hsic_ref(kx, ky);
    pp += hsic_ref(kx, kx);
    qq += hsic_ref(ky, ky);
  }
  return pq / std::sqrt(pp * qq);
}

}  // namespace

TEST_CASE("each collapse measure equals its formula, whatever the batch split") {
  torch::manual_seed(11);
  // 0, 1 and 5 prefix tokens, odd and even T, over a 3x3 and a 4x4 grid.
  for (const auto& [prefix, grid] : std::vector<std::pair<int64_t, int64_t>>{{0, 3}, {1, 3}, {5, 3}, {1, 4}}) {
    const int64_t L = 3, B = 10, H = 2, T = grid * grid + prefix, D = 6;
    INFO("prefix " << prefix << ", T " << T);
    const Inputs in = random_inputs(L, B, H, T, D);
    const MeasureResult whole = measure(in, options(prefix), {B});
    REQUIRE(whole.images == B);
    for (int64_t l = 0; l < L; ++l) {
      INFO("block " << l);
      for (int64_t h = 0; h < H; ++h) {
        // Per entry in the maps' float32, summed in float64.
        CHECK(whole.entropy[l][h].item<double>() == Approx(entropy_ref(in.maps[l], h)).epsilon(1e-6));
        CHECK(whole.distance[l][h].item<double>() == Approx(distance_ref(in.maps[l], h, prefix, 16)).epsilon(1e-6));
      }
      CHECK(whole.uniformity[l].item<double>() == Approx(uniformity_ref(in.features[l], prefix)).epsilon(1e-6));
      CHECK(whole.residual[l].item<double>() == Approx(residual_ref(in.features[l])).epsilon(1e-10));
      CHECK(whole.effective_rank[l].item<double>() == Approx(effective_rank_ref(in.features[l])).epsilon(1e-8));
      for (int64_t q = 0; q < L; ++q)  // minibatches of 4: 4 + 4, the last 2 images dropped
        CHECK(whole.cka[l][q].item<double>() == Approx(cka_ref(in.features[l], in.features[q], 4)).epsilon(1e-8));
    }
    // Streaming: other splits (one crossing a CKA minibatch) give the same numbers.
    for (const auto& splits : std::vector<std::vector<int64_t>>{{3, 2, 5}, {1, 9}, {7, 3}}) {
      const MeasureResult split = measure(in, options(prefix), splits);
      CHECK(max_abs_diff(split.entropy, whole.entropy) < 1e-6);
      CHECK(max_abs_diff(split.distance, whole.distance) < 1e-6);
      CHECK(max_abs_diff(split.uniformity, whole.uniformity) < 1e-6);
      CHECK(max_abs_diff(split.residual, whole.residual) < 1e-6);
      CHECK(max_abs_diff(split.effective_rank, whole.effective_rank) < 1e-6);
      CHECK(max_abs_diff(split.cka, whole.cka) < 1e-6);
    }
  }
}

TEST_CASE("collapse measures: known answers") {
  const int64_t B = 8, H = 2, prefix = 1, grid = 3, T = grid * grid + prefix, D = 5;
  SECTION("identical tokens: uniformity 1, residual 0, effective rank 1") {
    const torch::Tensor token = torch::randn({B, 1, D});
    const Inputs in{{torch::full({B, H, T, T}, 1.0 / T)}, {token.expand({B, T, D}).contiguous()}};
    const MeasureResult r = measure(in, options(prefix), {B});
    CHECK(r.uniformity[0].item<double>() == Approx(1.0).epsilon(1e-6));
    CHECK(r.residual[0].item<double>() == Approx(0.0).margin(1e-12));
    CHECK(r.effective_rank[0].item<double>() == Approx(1.0).epsilon(1e-6));
    // Uniform attention: entropy ln T.
    CHECK(r.entropy[0][0].item<double>() == Approx(std::log(static_cast<double>(T))).epsilon(1e-6));  // 1/T in float32
  }
  SECTION("one-hot diagonal attention: entropy 0, distance 0") {
    const Inputs in{{torch::eye(T).expand({B, H, T, T}).contiguous()}, {torch::randn({B, T, D})}};
    const MeasureResult r = measure(in, options(prefix), {B});
    CHECK(max_abs_diff(r.entropy, torch::zeros({1, H})) == 0.0);
    CHECK(max_abs_diff(r.distance, torch::zeros({1, H})) == 0.0);
  }
  SECTION("CKA: 1 for a block with itself, invariant to an orthogonal transform and isotropic scaling") {
    torch::manual_seed(3);
    const torch::Tensor a = torch::randn({B, T, D}), b = a + 0.7 * torch::randn({B, T, D});
    const torch::Tensor q = std::get<0>(torch::linalg_qr(torch::randn({D, D}, torch::kDouble)));
    const torch::Tensor rotated = 3.5 * torch::matmul(b.to(torch::kDouble), q);
    Inputs in{{}, {a, b, rotated.to(torch::kFloat)}};
    for (int l = 0; l < 3; ++l) in.maps.push_back(torch::full({B, H, T, T}, 1.0 / T));
    const MeasureResult r = measure(in, options(prefix), {B});
    CHECK(max_abs_diff(r.cka.diagonal(), torch::ones({3}, torch::kDouble)) < 1e-10);
    CHECK(r.cka[0][2].item<double>() == Approx(r.cka[0][1].item<double>()).epsilon(1e-5));
    CHECK(r.cka[1][2].item<double>() == Approx(1.0).epsilon(1e-5));
    CHECK(r.cka[0][1].item<double>() < 0.99);
  }
}

TEST_CASE("collapse measures: bad options and inputs are clear errors") {
  MeasureOptions o;
  o.measures = {"entropy", "rank"};
  CHECK_THROWS_WITH(o.validate(), Catch::Contains("analysis measure 'rank' is unknown"));
  CHECK_THROWS_WITH(MeasureAccumulator(2, 2, 11, options(1)), Catch::Contains("not a square grid"));
  MeasureAccumulator acc(2, 2, 10, options(1));
  CHECK_THROWS_WITH(acc.add_maps(0, torch::rand({1, 2, 9, 9})),
                    Catch::Contains("expected block 0's maps [B, 2, 10, 10]"));
  CHECK_THROWS_WITH(acc.add_features({torch::rand({1, 10, 4})}), Catch::Contains("the outputs of 2 blocks, got 1"));
}

TEST_CASE("per-image values: each image's measures and adjacent similarity, their mean the result") {
  torch::manual_seed(5);
  // T = 10: the CPU kernel; T = 7 (fewer than 8 columns): batched products.
  for (const int64_t grid : {3, 2}) {
    const int64_t L = 3, B = 6, H = 2, T = grid * grid + 1, D = 5;
    INFO("T " << T);
    const Inputs in = random_inputs(L, B, H, T, D);
    const MeasureResult r = measure(in, options(1), {4, 2});
    REQUIRE(r.image_residual.sizes() == torch::IntArrayRef({B, L}));
    CHECK(max_abs_diff(r.image_residual.mean(0), r.residual) < 1e-12);
    CHECK(max_abs_diff(r.image_uniformity.mean(0), r.uniformity) < 1e-12);
    CHECK(max_abs_diff(r.image_effective_rank.mean(0), r.effective_rank) < 1e-12);
    SimilarityAccumulator all(L, H, T);
    std::vector<torch::Tensor> first, rest;
    for (const auto& m : in.maps) {
      first.push_back(m.narrow(0, 0, 4));
      rest.push_back(m.narrow(0, 4, 2));
    }
    all.add(first);
    all.add(rest);
    const SimilarityResult s = all.result();
    REQUIRE(s.image_adjacent.sizes() == torch::IntArrayRef({B, L - 1}));
    CHECK(max_abs_diff(s.image_adjacent.mean(0), s.adjacent) < 1e-6);
    for (const int64_t i : {int64_t{0}, B - 1}) {
      INFO("image " << i);
      std::vector<torch::Tensor> maps;
      for (const auto& m : in.maps) maps.push_back(m.narrow(0, i, 1));
      SimilarityAccumulator one(L, H, T);
      one.add(maps);
      CHECK(max_abs_diff(s.image_adjacent[i], one.result().adjacent) < 1e-6);
      for (int64_t l = 0; l < L; ++l) {
        const torch::Tensor f = in.features[l].narrow(0, i, 1);
        CHECK(r.image_residual[i][l].item<double>() == Approx(residual_ref(f)).epsilon(1e-10));
        CHECK(r.image_uniformity[i][l].item<double>() == Approx(uniformity_ref(f, 1)).epsilon(1e-6));
        CHECK(r.image_effective_rank[i][l].item<double>() == Approx(effective_rank_ref(f)).epsilon(1e-8));
      }
    }
  }
}

TEST_CASE("bootstrap intervals over images: the mean's spread and clear errors") {
  torch::manual_seed(2);
  const int64_t n = 400;
  const torch::Tensor x = torch::randn({n, 1}, torch::kDouble) * 2.0 + 1.0;
  const auto first = [](const torch::Tensor& means) { return means[0].item<double>(); };
  const Interval i = bootstrap_interval({x}, first);
  // About the normal interval of a mean: ±1.96 standard errors.
  const double mean = x.mean().item<double>(), se = x.std().item<double>() / std::sqrt(static_cast<double>(n));
  CHECK(i.low < mean);
  CHECK(i.high > mean);
  CHECK(i.high - i.low == Approx(2 * 1.96 * se).epsilon(0.15));
  CHECK(bootstrap_interval({x}, first).low == i.low);  // its own generator: the same draws
  BootstrapOptions other;
  other.seed = 1;
  CHECK(bootstrap_interval({x}, first, other).low != i.low);
  const Interval flat = bootstrap_interval({torch::full({50, 2}, 3.0, torch::kDouble)}, first);
  CHECK(flat.low == Approx(3.0));
  CHECK(flat.high == Approx(3.0));
  // Members resampled alike: for a linear statistic, the interval of their average.
  const torch::Tensor y = torch::randn({n, 1}, torch::kDouble);
  const Interval both = bootstrap_interval({x, y}, first), average = bootstrap_interval({(x + y) / 2}, first);
  CHECK(both.low == Approx(average.low).epsilon(1e-12));
  CHECK(both.high == Approx(average.high).epsilon(1e-12));
  CHECK_THROWS_WITH(bootstrap_interval({x, torch::zeros({3, 1})}, first),
                    Catch::Contains("member 1's values have shape [3, 1], expected [N, K] with the N = 400"));
  other.level = 1.0;
  CHECK_THROWS_WITH(bootstrap_interval({x}, first, other), Catch::Contains("level must be in (0, 1), got 1"));
}
