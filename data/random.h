#pragma once
// The random draws the data pipeline shares (image transforms, Mixup/CutMix):
// every draw comes from the caller's rng, so that a seed gives the same
// batches whichever thread or process makes them.
#include <random>

namespace vitlab {

// Uniform in [lo, hi), from the top 53 bits (the same on every platform).
inline double uniform(std::mt19937_64& rng, double lo = 0.0, double hi = 1.0) {
  return lo + (hi - lo) * static_cast<double>(rng() >> 11) * 0x1.0p-53;
}

// Uniform integer in [lo, hi], both included (Python's random.randint).
inline int randint(std::mt19937_64& rng, int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); }

// Beta(alpha, alpha) as X / (X + Y) of two Gamma(alpha, 1) draws (timm's
// Mixup draws np.random.beta(alpha, alpha)).
inline double sample_beta(double alpha, std::mt19937_64& rng) {
  std::gamma_distribution<double> gamma(alpha, 1.0);
  const double x = gamma(rng);
  const double y = gamma(rng);
  if (x + y == 0) return 1.0;  // both underflowed (tiny alpha): no mixing
  return x / (x + y);
}

}  // namespace vitlab
