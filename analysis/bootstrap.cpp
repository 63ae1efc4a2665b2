#include "analysis/bootstrap.h"

#include <fmt/ranges.h>

#include <random>

#include "common/error.h"

namespace vitlab {

namespace {

// How often each image is drawn in each resample: [R, N], rows summing to N.
torch::Tensor draw_counts(int64_t resamples, int64_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int64_t> image(0, n - 1);
  torch::Tensor counts = torch::zeros({resamples, n}, torch::kDouble);
  double* c = counts.data_ptr<double>();
  for (int64_t r = 0; r < resamples; ++r)
    for (int64_t i = 0; i < n; ++i) c[r * n + image(rng)] += 1.0;
  return counts;
}

}  // namespace

Interval bootstrap_interval(const std::vector<torch::Tensor>& per_image,
                            const std::function<double(const torch::Tensor&)>& statistic, const BootstrapOptions& o) {
  if (per_image.empty()) fail("bootstrap: no member's values");
  if (o.resamples < 2) fail("bootstrap: resamples must be >= 2, got {}", o.resamples);
  if (!(o.level > 0.0 && o.level < 1.0)) fail("bootstrap: level must be in (0, 1), got {}", o.level);
  const int64_t n = per_image[0].size(0);
  for (size_t m = 0; m < per_image.size(); ++m)
    if (per_image[m].dim() != 2 || per_image[m].size(0) != n || n < 1)
      fail("bootstrap: member {}'s values have shape {}, expected [N, K] with the N = {} images of the others", m,
           per_image[m].sizes().vec(), n);
  const torch::Tensor weights = draw_counts(o.resamples, n, o.seed) / static_cast<double>(n);
  torch::Tensor values = torch::zeros({o.resamples}, torch::kDouble);
  double* v = values.data_ptr<double>();
  for (const auto& member : per_image) {
    const torch::Tensor means = weights.mm(member.to(torch::kCPU, torch::kDouble));  // [R, K]
    for (int64_t r = 0; r < o.resamples; ++r) v[r] += statistic(means[r]) / static_cast<double>(per_image.size());
  }
  // Percentiles interpolated linearly, as numpy's default.
  const double tail = (1.0 - o.level) / 2.0;
  const torch::Tensor bounds = torch::quantile(values, torch::tensor({tail, 1.0 - tail}, torch::kDouble));
  return {bounds[0].item<double>(), bounds[1].item<double>()};
}

}  // namespace vitlab
