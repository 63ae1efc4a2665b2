#pragma once
// timm's Mixup in batch mode (timm.data.Mixup, mode 'batch'): Mixup or CutMix
// on a whole batch of images, one lambda per batch, with the label-smoothed
// soft targets mixed alike (for train/loss.h's soft_target_cross_entropy).
// They act on batches and targets, after the per-image transforms of
// data/transforms.h.
#include <torch/torch.h>

#include <cstdint>
#include <random>

namespace vitlab {

struct MixupOptions {
  double mixup_alpha = 0.0;   // timm: --mixup
  double cutmix_alpha = 0.0;  // timm: --cutmix
  double prob = 1.0;          // timm: --mixup-prob
  double switch_prob = 0.5;   // timm: --mixup-switch-prob
  double label_smoothing = 0.1;
  int64_t num_classes = 1000;
  bool enabled() const { return (mixup_alpha > 0 || cutmix_alpha > 0) && prob > 0; }
};
// Batch-level Mixup/CutMix as timm's Mixup (mode 'batch': image i mixed with
// image B-1-i; the CutMix box's lambda corrected to its true area); modifies
// images [B,C,H,W] in place and returns soft targets [B, num_classes]
// (label-smoothed one-hots mixed with lam). Randomness from rng.
torch::Tensor mixup_batch(torch::Tensor& images, const torch::Tensor& labels, const MixupOptions& options,
                          std::mt19937_64& rng);
// Label-smoothed one-hot targets [B, num_classes], float: off = smoothing /
// num_classes, on = 1 - smoothing + off (timm). A label out of range is an Error.
torch::Tensor smooth_one_hot(const torch::Tensor& labels, int64_t num_classes, double smoothing);

}  // namespace vitlab
