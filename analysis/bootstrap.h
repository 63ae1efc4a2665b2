#pragma once
// Percentile bootstrap intervals over evaluation images (Efron & Tibshirani
// 1993, ch. 13): the images are drawn with replacement, the statistic
// recomputed on each resample, and the interval is the resamples' 2.5th and
// 97.5th percentiles. A study's members are analysed on the same images, so
// one draw resamples every member alike (the members' statistic averaged):
// the interval then says how much the numbers depend on which images were
// analysed, which seeds do not show.
#include <torch/torch.h>

#include <cstdint>
#include <functional>
#include <vector>

namespace vitlab {

struct BootstrapOptions {
  int64_t resamples = 2000;
  double level = 0.95;
  uint64_t seed = 0;  // the draws' own generator: the same seed, the same interval
};

struct Interval {
  double low = 0.0, high = 0.0;
};

// per_image: one [N, K] float tensor per member, row i the values of image i
// (the same N images for every member). statistic: a member's number from
// the mean of its rows over a resample's images ([K], float64). Returns the
// interval of the statistic averaged over the members.
Interval bootstrap_interval(const std::vector<torch::Tensor>& per_image,
                            const std::function<double(const torch::Tensor&)>& statistic,
                            const BootstrapOptions& options = {});

}  // namespace vitlab
