#pragma once
// timm's image transforms on 8-bit OpenCV images: for training
// RandomResizedCrop, flip, RandAugment or colour jitter, normalize and random
// erasing; for evaluation resize, center crop and normalize. The ops follow
// timm's PIL pipeline (antialiased resizing, PIL's ImageOps/ImageEnhance
// arithmetic) so that hyper-parameters tuned with timm mean the same here.
// Mixup/CutMix, which act on batches, are in data/mixup.h; the soft-target
// loss in train/loss.h.
#include <torch/torch.h>

#include <opencv2/core.hpp>
#include <random>
#include <string>
#include <vector>

namespace vitlab {

// The keys named in errors are those of a training configuration: aug.<name>,
// and model.img_size / model.in_chans, which come from the model.
struct TransformOptions {
  int64_t img_size = 224;
  int64_t in_chans = 3;  // images arrive as 8-bit HWC cv::Mat with in_chans channels (RGB order or grey)
  std::vector<double> mean = {0.485, 0.456, 0.406};  // per channel, in [0,1] units; size 1 when in_chans == 1
  std::vector<double> std = {0.229, 0.224, 0.225};
  // training
  std::vector<double> scale = {0.08, 1.0};             // RandomResizedCrop area range
  std::vector<double> ratio = {3.0 / 4.0, 4.0 / 3.0};  // aspect ratio range (sampled log-uniform, as torchvision)
  std::string interpolation = "bicubic";               // bilinear | bicubic | nearest (also for eval resize)
  double hflip = 0.5;
  std::string auto_augment = "";  // "" (off) or timm's RandAugment string, e.g. "rand-m9-mstd0.5-inc1"
  double color_jitter = 0.0;      // brightness/contrast/saturation factor, 0 = off; only when auto_augment is off
  double reprob = 0.0;            // random erasing probability (after normalize, per-pixel normal noise)
  // evaluation
  double crop_pct = 0.875;  // resize the short side to img_size / crop_pct, then center crop img_size
  void validate() const;
};

// Training: RandomResizedCrop -> hflip -> RandAugment or color jitter -> to
// float [C,H,W] in [0,1] -> normalize -> random erasing. All randomness comes
// from `rng`. An image that is not 8-bit with in_chans channels is an Error.
// Both transforms are safe to call from several loader threads at once and
// use no LibTorch intra-op parallelism (plain loops and OpenCV).
torch::Tensor train_transform(const cv::Mat& image, const TransformOptions& options, std::mt19937_64& rng);
// Evaluation: resize (short side to floor(img_size / crop_pct)) -> center
// crop -> normalize. Deterministic.
torch::Tensor eval_transform(const cv::Mat& image, const TransformOptions& options);

// A parsed timm RandAugment string "rand-<key><value>-...": m (magnitude,
// 0..10; 10 when absent, as timm), n (ops per image), mstd (std of the
// per-op gaussian noise on the magnitude; > 100: uniform in [0, m]), p (each
// op's probability), inc (1: the increasing-magnitude ops). Magnitudes are
// clipped to [0, 10]. Invalid strings are errors naming aug.auto_augment and
// the bad part.
struct RandAugmentSpec {
  int magnitude = 9;
  int num_ops = 2;
  double magnitude_std = 0.0;
  double prob = 0.5;
  bool increasing = false;
};
RandAugmentSpec parse_rand_augment(const std::string& text);

// timm's RandAugment op names, in its order: _RAND_INCREASING_TRANSFORMS
// (increasing) or _RAND_TRANSFORMS.
const std::vector<std::string>& rand_augment_ops(bool increasing);
// One op by name at a magnitude in [0, 10], always applied; the sign of the
// signed ops (rotate, shear, translate, increasing enhancements) is drawn from
// rng. Geometric ops fill with the mean colour and use options.interpolation.
cv::Mat augment_op(const cv::Mat& image, const std::string& name, double magnitude, const TransformOptions& options,
                   std::mt19937_64& rng);
// RandAugment: spec.num_ops ops drawn with replacement, each applied with
// probability spec.prob at a (noisy, clipped) magnitude.
cv::Mat rand_augment(const cv::Mat& image, const RandAugmentSpec& spec, const TransformOptions& options,
                     std::mt19937_64& rng);

}  // namespace vitlab
