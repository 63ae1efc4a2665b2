#include "data/mixup.h"

#include <fmt/ranges.h>

#include <algorithm>
#include <cmath>

#include "common/error.h"
#include "data/random.h"

namespace vitlab {

torch::Tensor smooth_one_hot(const torch::Tensor& labels, int64_t num_classes, double smoothing) {
  if (labels.dim() != 1) fail("labels must be a 1-D tensor, got shape {}", labels.sizes());
  if (num_classes < 1) fail("num_classes must be >= 1, got {}", num_classes);
  torch::Tensor index = labels.to(torch::kLong);
  if (index.numel() > 0) {
    const int64_t lo = index.min().item<int64_t>(), hi = index.max().item<int64_t>();
    if (lo < 0 || hi >= num_classes) fail("label {} is out of range for {} classes", lo < 0 ? lo : hi, num_classes);
  }
  const double off = smoothing / static_cast<double>(num_classes);
  const double on = 1.0 - smoothing + off;
  return torch::full({labels.size(0), num_classes}, off, labels.options().dtype(torch::kFloat))
      .scatter_(1, index.unsqueeze(1), on);
}

torch::Tensor mixup_batch(torch::Tensor& images, const torch::Tensor& labels, const MixupOptions& options,
                          std::mt19937_64& rng) {
  if (images.dim() != 4) fail("mixup takes images [B, C, H, W], got shape {}", images.sizes());
  if (labels.dim() != 1 || labels.size(0) != images.size(0))
    fail("mixup: {} labels for {} images", labels.dim() == 1 ? labels.size(0) : labels.numel(), images.size(0));
  // timm's Mixup._params_per_batch.
  double lam = 1.0;
  bool cutmix = false;
  if (options.enabled() && uniform(rng) < options.prob) {
    if (options.mixup_alpha > 0 && options.cutmix_alpha > 0) {
      cutmix = uniform(rng) < options.switch_prob;
      lam = sample_beta(cutmix ? options.cutmix_alpha : options.mixup_alpha, rng);
    } else if (options.mixup_alpha > 0) {
      lam = sample_beta(options.mixup_alpha, rng);
    } else {
      cutmix = true;
      lam = sample_beta(options.cutmix_alpha, rng);
    }
  }
  if (lam != 1.0) {
    torch::NoGradGuard no_grad;
    if (cutmix) {
      // timm's rand_bbox: a box of side sqrt(1 - lam) times the image's at a uniform centre, clipped to the image.
      const int64_t h = images.size(2), w = images.size(3);
      const double side = std::sqrt(1 - lam);
      const auto cut_h = static_cast<int64_t>(h * side), cut_w = static_cast<int64_t>(w * side);
      const int64_t cy = randint(rng, 0, static_cast<int>(h) - 1), cx = randint(rng, 0, static_cast<int>(w) - 1);
      const int64_t y0 = std::clamp<int64_t>(cy - cut_h / 2, 0, h), y1 = std::clamp<int64_t>(cy + cut_h / 2, 0, h);
      const int64_t x0 = std::clamp<int64_t>(cx - cut_w / 2, 0, w), x1 = std::clamp<int64_t>(cx + cut_w / 2, 0, w);
      torch::Tensor patch = images.flip(0).narrow(2, y0, y1 - y0).narrow(3, x0, x1 - x0);
      images.narrow(2, y0, y1 - y0).narrow(3, x0, x1 - x0).copy_(patch);
      lam = 1.0 - static_cast<double>((y1 - y0) * (x1 - x0)) / static_cast<double>(h * w);
    } else {
      torch::Tensor flipped = images.flip(0).mul_(1.0 - lam);
      images.mul_(lam).add_(flipped);
    }
  }
  const torch::Tensor y = smooth_one_hot(labels, options.num_classes, options.label_smoothing);
  return y * lam + y.flip(0) * (1.0 - lam);
}

}  // namespace vitlab
