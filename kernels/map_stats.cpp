#include "kernels/map_stats.h"

#include "kernels/simd.h"

namespace vitlab {

namespace {

using simd::kW;
using simd::Lanes;

// -Σ_j x_j ln x_j over a row of n floats.
VITLAB_LANES double row_entropy(const float* row, int64_t n) {
  Lanes acc{};
  int64_t j = 0;
  for (; j + kW <= n; j += kW) acc += simd::xlogx(simd::load(row + j));
  float tail[kW] = {};
  for (int64_t k = 0; j + k < n; ++k) tail[k] = row[j + k];
  acc += simd::xlogx(simd::load(tail));
  return -static_cast<double>(simd::sum(acc));
}

// Σ_j x_j d_j / Σ_j x_j over a row of n floats.
VITLAB_LANES double row_distance(const float* row, const float* d, int64_t n) {
  Lanes weighted{}, total{};
  int64_t j = 0;
  for (; j + kW <= n; j += kW) {
    const Lanes x = simd::load(row + j);
    weighted += x * simd::load(d + j);
    total += x;
  }
  double w = simd::sum(weighted), t = simd::sum(total);
  for (; j < n; ++j) {
    w += static_cast<double>(row[j]) * d[j];
    t += row[j];
  }
  return w / t;
}

}  // namespace

VITLAB_CLONES MapStats map_stats(const float* map, int64_t N, int64_t prefix, const float* pixels) {
  MapStats s;
  const int64_t n = N - prefix;
  for (int64_t i = 0; i < N; ++i) {
    const float* row = map + i * N;
    s.entropy += row_entropy(row, N);
    if (pixels && i >= prefix) s.distance += row_distance(row + prefix, pixels + (i - prefix) * n, n);
  }
  return s;
}

}  // namespace vitlab
