#include <catch2/catch.hpp>
#include <cmath>
#include <limits>
#include <opencv2/core.hpp>

#include "common/error.h"
#include "data/mixup.h"
#include "data/transforms.h"
#include "tests/helpers.h"
#include "train/loss.h"

using namespace vitlab;
using vitlab::test::max_abs_diff;

namespace {

cv::Mat random_image(int rows, int cols, int chans, uint64_t seed) {
  cv::Mat m(rows, cols, CV_8UC(chans));
  cv::RNG rng(seed);
  rng.fill(m, cv::RNG::UNIFORM, 0, 256);
  return m;
}

TransformOptions options_for(int64_t img_size, int64_t in_chans) {
  TransformOptions o;
  o.img_size = img_size;
  o.in_chans = in_chans;
  if (in_chans == 1) o.mean = {0.5}, o.std = {0.5};
  return o;
}

// An 8-bit image as (x / 255 - mean) / std, [C,H,W], computed apart from the transforms.
torch::Tensor normalized(const cv::Mat& image, const TransformOptions& o) {
  const int c = image.channels();
  torch::Tensor x = torch::empty({c, image.rows, image.cols});
  auto a = x.accessor<float, 3>();
  for (int y = 0; y < image.rows; ++y)
    for (int i = 0; i < image.cols; ++i)
      for (int k = 0; k < c; ++k)
        a[k][y][i] =
            (image.ptr<uchar>(y)[i * c + k] / 255.0f - static_cast<float>(o.mean[k])) / static_cast<float>(o.std[k]);
  return x;
}

cv::Mat flipped(const cv::Mat& image) {
  cv::Mat out;
  cv::flip(image, out, 1);
  return out;
}

// Rows and columns [first, last] where `mask` [H, W] is true.
struct Box {
  int64_t y0, y1, x0, x1;
  int64_t area() const { return (y1 - y0 + 1) * (x1 - x0 + 1); }
};
Box bounding_box(const torch::Tensor& mask) {
  torch::Tensor rows = mask.any(1).nonzero(), cols = mask.any(0).nonzero();
  return {rows.min().item<int64_t>(), rows.max().item<int64_t>(), cols.min().item<int64_t>(),
          cols.max().item<int64_t>()};
}
torch::Tensor box_mask(const Box& b, int64_t h, int64_t w) {
  torch::Tensor m = torch::zeros({h, w}, torch::kBool);
  m.slice(0, b.y0, b.y1 + 1).slice(1, b.x0, b.x1 + 1).fill_(true);
  return m;
}

}  // namespace

TEST_CASE("transforms: [C, img_size, img_size] float for grey and RGB, any input shape") {
  for (int chans : {1, 3}) {
    TransformOptions o = options_for(24, chans);
    o.auto_augment = "rand-m9-mstd0.5-inc1";
    o.reprob = 0.5;
    TransformOptions jitter = options_for(24, chans);
    jitter.color_jitter = 0.4;
    for (auto [rows, cols] : {std::pair{5, 40}, {40, 5}, {1, 1}, {24, 24}, {300, 200}}) {
      INFO(chans << " channels, " << rows << "x" << cols);
      const cv::Mat img = random_image(rows, cols, chans, rows * 1000 + cols);
      std::mt19937_64 rng(rows + cols);
      for (const torch::Tensor& x :
           {train_transform(img, o, rng), train_transform(img, jitter, rng), eval_transform(img, o)}) {
        CHECK(x.sizes() == torch::IntArrayRef({chans, 24, 24}));
        CHECK(x.scalar_type() == torch::kFloat);
        CHECK(torch::isfinite(x).all().item<bool>());
      }
    }
  }
  CHECK_THROWS_WITH(eval_transform(random_image(8, 8, 3, 0), options_for(8, 1)),
                    Catch::Contains("model.in_chans = 1") && Catch::Contains("3 channels"));
}

TEST_CASE("transforms: eval normalizes exactly, crops the center, is the identity at crop_pct 1") {
  TransformOptions o = options_for(16, 3);
  const cv::Mat constant(50, 70, CV_8UC3, cv::Scalar(200, 100, 7));
  torch::Tensor x = eval_transform(constant, o);
  const float values[] = {200, 100, 7};
  for (int c = 0; c < 3; ++c) {
    const float expected = (values[c] / 255.0f - static_cast<float>(o.mean[c])) / static_cast<float>(o.std[c]);
    CHECK(max_abs_diff(x[c], torch::full({16, 16}, expected)) <= 1e-6);
  }

  // crop_pct 1 on an img_size square: no resize, no crop.
  o.crop_pct = 1.0;
  const cv::Mat img = random_image(16, 16, 3, 1);
  CHECK(max_abs_diff(eval_transform(img, o), normalized(img, o)) <= 1e-6);

  // No resize when the short side is img_size: the crop offset is round((long - 16) / 2), halves to even.
  TransformOptions grey = options_for(16, 1);
  grey.crop_pct = 1.0;
  grey.mean = {0.0};
  grey.std = {1.0 / 255};  // the output is the pixel value
  for (auto [cols, left] : {std::pair{36, 10}, {35, 10}, {37, 10}, {39, 12}}) {
    INFO(cols << " columns");
    cv::Mat ramp(16, cols, CV_8UC1);
    for (int i = 0; i < cols; ++i) ramp.col(i).setTo(i);
    torch::Tensor out = eval_transform(ramp, grey);
    CHECK(out[0][3][0].item<float>() == Approx(left));
    CHECK(out[0][3][15].item<float>() == Approx(left + 15));
    torch::Tensor tall = eval_transform(ramp.t(), grey);
    CHECK(tall[0][0][3].item<float>() == Approx(left));
  }

  // PIL's antialiased bilinear from 4 to 2 pixels weighs (3, 3, 1) / 7 and (1, 3, 3) / 7.
  TransformOptions pil = grey;
  pil.img_size = 1;
  pil.crop_pct = 0.5;  // resize to 2x2, keep the top left pixel
  pil.interpolation = "bilinear";
  const cv::Mat ramp4 = (cv::Mat_<uchar>(4, 4) << 0, 70, 140, 210, 0, 70, 140, 210, 0, 70, 140, 210, 0, 70, 140, 210);
  CHECK(eval_transform(ramp4, pil).item<float>() == Approx(50));  // (3 * 0 + 3 * 70 + 140) / 7
  CHECK(eval_transform(flipped(ramp4), pil).item<float>() == Approx(160));

  // A marked center survives resize (64 -> 32 for crop_pct 0.5) and crop (the middle 16).
  TransformOptions unit = options_for(16, 1);
  unit.mean = {0.0};
  unit.std = {1.0};
  unit.crop_pct = 0.5;
  cv::Mat marked(64, 64, CV_8UC1, cv::Scalar(0));
  marked(cv::Rect(28, 28, 8, 8)).setTo(255);
  torch::Tensor m = eval_transform(marked, unit)[0];
  CHECK(m.slice(0, 7, 9).slice(1, 7, 9).min().item<float>() > 0.95);
  CHECK(m.slice(0, 0, 4).abs().max().item<float>() < 0.01);
  CHECK(m.slice(1, 12, 16).abs().max().item<float>() < 0.01);
}

TEST_CASE("transforms: train is deterministic for a seed and differs across seeds") {
  TransformOptions o = options_for(32, 3);
  o.auto_augment = "rand-m9-mstd0.5-inc1";
  o.reprob = 0.25;
  const cv::Mat img = random_image(40, 60, 3, 2);
  std::mt19937_64 a(7), b(7), c(8);
  torch::Tensor x = train_transform(img, o, a);
  CHECK(torch::equal(x, train_transform(img, o, b)));
  CHECK_FALSE(torch::equal(x, train_transform(img, o, c)));
  CHECK_FALSE(torch::equal(x, train_transform(img, o, a)));  // the rng moved on
}

TEST_CASE("transforms: train hflip=1 flips, hflip=0 does not") {
  TransformOptions o = options_for(16, 3);
  o.scale = {1.0, 1.0};
  o.ratio = {1.0, 1.0};  // the crop is the whole square image
  o.crop_pct = 1.0;
  const cv::Mat img = random_image(16, 16, 3, 3);
  o.hflip = 1.0;
  std::mt19937_64 rng(0);
  CHECK(torch::equal(train_transform(img, o, rng), eval_transform(flipped(img), o)));
  o.hflip = 0.0;
  CHECK(torch::equal(train_transform(img, o, rng), eval_transform(img, o)));
}

TEST_CASE("transforms: RandAugment strings parse as timm's, bad ones name aug.auto_augment") {
  RandAugmentSpec s = parse_rand_augment("rand-m9-mstd0.5-inc1");
  CHECK(s.magnitude == 9);
  CHECK(s.magnitude_std == 0.5);
  CHECK(s.increasing);
  CHECK(s.num_ops == 2);
  CHECK(s.prob == 0.5);
  s = parse_rand_augment("rand-m7-n3");
  CHECK(s.magnitude == 7);
  CHECK(s.num_ops == 3);
  CHECK_FALSE(s.increasing);
  CHECK(s.magnitude_std == 0.0);
  s = parse_rand_augment("rand-n1-p0.8-mstd101");
  CHECK(s.magnitude == 10);  // timm's default
  CHECK(s.prob == 0.8);
  CHECK(std::isinf(s.magnitude_std));  // > 100: uniform magnitudes
  CHECK_FALSE(parse_rand_augment("rand-m9-inc0").increasing);

  for (auto [text, part] : {std::pair{"rand-mx", "'mx'"},
                            {"rand-q3", "'q3'"},
                            {"rand-m9x", "'m9x'"},
                            {"rand-p2", "'p2'"},
                            {"rand--m9", "''"},
                            {"rand-n0", "'n0'"},
                            {"rand-9", "'9'"}}) {
    INFO(text);
    CHECK_THROWS_WITH(parse_rand_augment(text), Catch::Contains("aug.auto_augment") && Catch::Contains(part));
  }
  CHECK_THROWS_WITH(parse_rand_augment("augmix-m5"), Catch::Contains("aug.auto_augment 'augmix-m5'"));
  CHECK_THROWS_WITH(parse_rand_augment(""), Catch::Contains("aug.auto_augment"));
  TransformOptions o;
  o.auto_augment = "rand-m9-z1";
  CHECK_THROWS_WITH(o.validate(), Catch::Contains("aug.auto_augment") && Catch::Contains("'z1'"));
}

TEST_CASE("transforms: RandAugment ops follow PIL's arithmetic") {
  TransformOptions o = options_for(16, 1);
  o.interpolation = "nearest";  // exact pixel positions
  std::mt19937_64 rng(0);
  auto op = [&](const cv::Mat& img, const char* name, double m) { return augment_op(img, name, m, o, rng); };
  auto equal = [](const cv::Mat& a, const cv::Mat& b) {
    return a.size() == b.size() && a.type() == b.type() && cv::norm(a, b, cv::NORM_INF) == 0;
  };

  for (bool increasing : {false, true})
    for (const std::string& name : rand_augment_ops(increasing))
      for (int chans : {1, 3}) {
        INFO(name << ", " << chans << " channels");
        TransformOptions oc = options_for(16, chans);
        const cv::Mat img = random_image(20, 24, chans, 4);
        cv::Mat out = augment_op(img, name, 5, oc, rng);
        CHECK(out.size() == img.size());
        CHECK(out.type() == img.type());
      }
  CHECK(rand_augment_ops(true).size() == 15);
  CHECK(rand_augment_ops(true)[4] == "PosterizeIncreasing");
  CHECK_THROWS_WITH(op(random_image(4, 4, 1, 0), "Cutout", 5), Catch::Contains("unknown RandAugment op 'Cutout'"));

  const cv::Mat img = random_image(20, 24, 1, 5);
  CHECK(equal(op(img, "Invert", 3), 255 - img));
  CHECK(equal(op(img, "SolarizeIncreasing", 10), 255 - img));  // threshold 0: every pixel inverted
  CHECK(equal(op(img, "SolarizeIncreasing", 0), img));
  CHECK(equal(op(img, "Solarize", 10), img));                        // threshold 256: none
  CHECK(cv::countNonZero(op(img, "PosterizeIncreasing", 10)) == 0);  // 0 bits
  cv::Mat four_bits;
  cv::bitwise_and(img, cv::Scalar(0xf0), four_bits);
  CHECK(equal(op(img, "PosterizeIncreasing", 0), four_bits));
  CHECK(equal(op(img, "BrightnessIncreasing", 0), img));  // factor 1
  CHECK(equal(op(img, "ColorIncreasing", 10), img));      // grey images have no saturation

  cv::Mat levels = (cv::Mat_<uchar>(1, 4) << 20, 100, 140, 200);
  CHECK(equal(op(levels, "SolarizeAdd", 10), (cv::Mat_<uchar>(1, 4) << 130, 210, 140, 200)));

  cv::Mat narrow(8, 8, CV_8UC3);
  narrow.setTo(cv::Scalar(50, 60, 70));
  narrow(cv::Rect(0, 0, 4, 8)).setTo(cv::Scalar(101, 60, 155));  // ranges 51 and 85: exact scales 5 and 3
  cv::Mat stretched = op(narrow, "AutoContrast", 5);
  CHECK(stretched.at<cv::Vec3b>(0, 0) == cv::Vec3b(255, 60, 255));  // G is constant: unchanged
  CHECK(stretched.at<cv::Vec3b>(0, 7) == cv::Vec3b(0, 60, 0));

  // PIL's equalize of half 10s, half 200s (1020 pixels): step 2, so 10 -> 0 and 200 -> 255.
  cv::Mat halves(34, 30, CV_8UC1, cv::Scalar(10));
  halves.rowRange(17, 34).setTo(200);
  cv::Mat eq = op(halves, "Equalize", 5);
  CHECK(eq.at<uchar>(0, 0) == 0);
  CHECK(eq.at<uchar>(33, 0) == 255);

  // Sharpness keeps the border and changes the interior.
  cv::Mat sharp = op(img, "Sharpness", 0);  // factor 0.1: mostly the smoothed image
  CHECK(equal(sharp.row(0), img.row(0)));
  CHECK(equal(sharp.col(23), img.col(23)));
  CHECK_FALSE(equal(sharp(cv::Rect(1, 1, 22, 18)), img(cv::Rect(1, 1, 22, 18))));

  // Rotation is about the image centre; what comes in is the mean colour.
  o.mean = {0.5};  // fill round(127.5) = 128
  cv::Mat dot(21, 21, CV_8UC1, cv::Scalar(0));
  dot.at<uchar>(10, 10) = 255;
  for (int i = 0; i < 4; ++i) {
    cv::Mat rotated = op(dot, "Rotate", 10);  // +-30 degrees
    CHECK(rotated.at<uchar>(10, 10) == 255);
    CHECK(rotated.at<uchar>(0, 0) == 128);
    CHECK(rotated.at<uchar>(1, 10) == 0);
  }

  // TranslateXRel at magnitude 10 shifts by 0.45 of the width, either way, filling with the mean.
  cv::Mat flat(6, 20, CV_8UC1, cv::Scalar(200));
  bool left = false, right = false;
  for (int i = 0; i < 8; ++i) {
    cv::Mat shifted = op(flat, "TranslateXRel", 10);
    CHECK(cv::countNonZero(shifted == 128) == 9 * 6);
    left |= shifted.at<uchar>(0, 0) == 128;
    right |= shifted.at<uchar>(0, 19) == 128;
    CHECK(cv::countNonZero(shifted.col(10) == 200) == 6);
  }
  CHECK((left && right));
}

TEST_CASE("transforms: RandAugment in train keeps shape and range, changes the image for some seeds") {
  TransformOptions plain = options_for(16, 3);
  plain.scale = {1.0, 1.0};
  plain.ratio = {1.0, 1.0};
  plain.hflip = 0.0;
  plain.crop_pct = 1.0;
  TransformOptions ra = plain;
  ra.auto_augment = "rand-m9-mstd0.5-inc1";
  const cv::Mat img = random_image(16, 16, 3, 6);
  const torch::Tensor reference = eval_transform(img, plain);
  // The normalized images of 0 and 255 bound every channel.
  torch::Tensor mean = torch::tensor(plain.mean).to(torch::kFloat).view({3, 1, 1});
  torch::Tensor std = torch::tensor(plain.std).to(torch::kFloat).view({3, 1, 1});
  const torch::Tensor lo = (0 - mean) / std - 1e-5, hi = (1 - mean) / std + 1e-5;
  int changed = 0;
  for (uint64_t seed = 0; seed < 20; ++seed) {
    std::mt19937_64 rng(seed);
    torch::Tensor x = train_transform(img, ra, rng);
    REQUIRE(x.sizes() == reference.sizes());
    CHECK((x >= lo).all().item<bool>());
    CHECK((x <= hi).all().item<bool>());
    changed += !torch::equal(x, reference);
  }
  CHECK(changed >= 10);
  CHECK(changed < 20);  // p 0.5 per op: some images get none

  // Colour jitter applies only when auto_augment is off.
  TransformOptions both = ra;
  both.color_jitter = 0.4;
  TransformOptions jitter = plain;
  jitter.color_jitter = 0.4;
  std::mt19937_64 a(3), b(3), c(3);
  CHECK(torch::equal(train_transform(img, both, a), train_transform(img, ra, b)));
  CHECK_FALSE(torch::equal(train_transform(img, jitter, c), reference));
}

TEST_CASE("transforms: random erasing replaces one box with noise, nothing else") {
  TransformOptions o = options_for(32, 3);
  o.auto_augment = "rand-m9-mstd0.5-inc1";
  TransformOptions erase = o;
  erase.reprob = 1.0;
  const cv::Mat img = random_image(50, 40, 3, 7);
  for (uint64_t seed = 0; seed < 5; ++seed) {
    INFO("seed " << seed);
    std::mt19937_64 a(seed), b(seed);
    torch::Tensor x = train_transform(img, o, a), y = train_transform(img, erase, b);
    torch::Tensor changed = (x != y).any(0);
    REQUIRE(changed.any().item<bool>());
    Box box = bounding_box(changed);
    CHECK(torch::equal(changed, box_mask(box, 32, 32)));
    CHECK(box.area() >= 10);
    CHECK(box.area() <= 32 * 32 / 3 + 40);
    CHECK(y.index({torch::indexing::Slice(), changed}).std().item<double>() == Approx(1.0).margin(0.35));
  }
}

TEST_CASE("transforms: smooth_one_hot and soft-target cross entropy match timm and torch") {
  torch::Tensor labels = torch::tensor({0, 2, 3}, torch::kLong);
  torch::Tensor t = smooth_one_hot(labels, 4, 0.1);
  CHECK(t.scalar_type() == torch::kFloat);
  CHECK(t[0][0].item<float>() == Approx(0.925));
  CHECK(t[0][1].item<float>() == Approx(0.025));
  CHECK(t[1][2].item<float>() == Approx(0.925));
  CHECK(max_abs_diff(t.sum(1), torch::ones({3})) < 1e-6);
  CHECK(torch::equal(smooth_one_hot(labels, 4, 0.0), torch::one_hot(labels, 4).to(torch::kFloat)));
  CHECK_THROWS_WITH(smooth_one_hot(labels, 3, 0.1), Catch::Contains("label 3 is out of range for 3 classes"));

  torch::manual_seed(0);
  torch::Tensor logits = torch::randn({3, 4});
  namespace F = torch::nn::functional;
  const double expected =
      F::cross_entropy(logits, labels, F::CrossEntropyFuncOptions().label_smoothing(0.1)).item<double>();
  CHECK(soft_target_cross_entropy(logits, t).item<double>() == Approx(expected).epsilon(1e-5));
}

TEST_CASE("transforms: mixup mixes with the flipped batch, cutmix pastes a box, targets follow lam") {
  const int64_t B = 4, H = 32, W = 32;
  torch::Tensor labels = torch::tensor({0, 1, 2, 3}, torch::kLong);
  MixupOptions o;
  o.num_classes = 5;
  o.label_smoothing = 0.1;
  const double off = 0.1 / 5, on = 1 - 0.1 + off;
  torch::manual_seed(1);
  const torch::Tensor x0 = torch::rand({B, 3, H, W});
  auto implied_lam = [&](const torch::Tensor& targets) { return (targets[0][0].item<double>() - off) / (on - off); };
  auto check_targets = [&](const torch::Tensor& targets, double lam) {
    CHECK(max_abs_diff(targets.sum(1), torch::ones({B})) < 1e-5);
    const torch::Tensor y = smooth_one_hot(labels, 5, 0.1);
    CHECK(max_abs_diff(targets, y * lam + y.flip(0) * (1 - lam)) < 1e-6);
  };

  o.mixup_alpha = 0.8;
  for (uint64_t seed = 0; seed < 5; ++seed) {
    std::mt19937_64 rng(seed);
    torch::Tensor x = x0.clone();
    torch::Tensor targets = mixup_batch(x, labels, o, rng);
    const double lam = implied_lam(targets);
    CHECK(lam > 0);
    CHECK(lam < 1);
    check_targets(targets, lam);
    CHECK(max_abs_diff(x, lam * x0 + (1 - lam) * x0.flip(0)) < 1e-5);
  }

  o.mixup_alpha = 0.0;
  o.cutmix_alpha = 1.0;
  int boxes = 0;
  for (uint64_t seed = 0; seed < 8; ++seed) {
    INFO("seed " << seed);
    std::mt19937_64 rng(seed);
    torch::Tensor x = x0.clone();
    torch::Tensor targets = mixup_batch(x, labels, o, rng);
    const double lam = implied_lam(targets);
    check_targets(targets, lam);
    torch::Tensor changed = (x != x0).any(1);  // [B, H, W]
    if (!changed.any().item<bool>()) {
      CHECK(lam == Approx(1.0));
      continue;
    }
    ++boxes;
    Box box = bounding_box(changed.any(0));
    for (int64_t i = 0; i < B; ++i) CHECK(torch::equal(changed[i], box_mask(box, H, W)));
    CHECK(1 - lam == Approx(static_cast<double>(box.area()) / (H * W)).margin(1e-5));
    auto inside = [&](const torch::Tensor& t) { return t.slice(2, box.y0, box.y1 + 1).slice(3, box.x0, box.x1 + 1); };
    CHECK(torch::equal(inside(x), inside(x0.flip(0))));
  }
  CHECK(boxes >= 6);

  // Both on: switch_prob 0 always mixes, never cuts.
  o.mixup_alpha = 1.0;
  o.switch_prob = 0.0;
  std::mt19937_64 rng(9);
  torch::Tensor x = x0.clone();
  const double lam = implied_lam(mixup_batch(x, labels, o, rng));
  CHECK(max_abs_diff(x, lam * x0 + (1 - lam) * x0.flip(0)) < 1e-5);

  // prob 0: nothing mixed, plain smoothed targets.
  o.prob = 0.0;
  CHECK_FALSE(o.enabled());
  x = x0.clone();
  CHECK(torch::equal(mixup_batch(x, labels, o, rng), smooth_one_hot(labels, 5, 0.1)));
  CHECK(torch::equal(x, x0));
}

TEST_CASE("transforms: validate names the key") {
  CHECK_NOTHROW(TransformOptions{}.validate());
  CHECK_NOTHROW(options_for(28, 1).validate());
  auto check = [](auto edit, const std::string& message) {
    TransformOptions o;
    edit(o);
    CHECK_THROWS_WITH(o.validate(), Catch::Contains(message));
  };
  check([](auto& o) { o.scale = {0.0, 1.0}; }, "aug.scale must be [min, max] with 0 < min <= max <= 1");
  check([](auto& o) { o.scale = {0.5, 0.2}; }, "aug.scale");
  check([](auto& o) { o.scale = {0.5}; }, "aug.scale");
  check([](auto& o) { o.ratio = {2.0, 1.0}; }, "aug.ratio");
  check([](auto& o) { o.ratio = {0.0, 1.0}; }, "aug.ratio");
  check([](auto& o) { o.interpolation = "lanczos"; }, "aug.interpolation must be one of bilinear, bicubic, nearest");
  check([](auto& o) { o.hflip = 1.5; }, "aug.hflip");
  check([](auto& o) { o.reprob = -0.1; }, "aug.reprob");
  check([](auto& o) { o.color_jitter = -1; }, "aug.color_jitter");
  check([](auto& o) { o.crop_pct = 0; }, "aug.crop_pct");
  check([](auto& o) { o.crop_pct = 1.2; }, "aug.crop_pct");
  check([](auto& o) { o.mean = {0.5, 0.5}; }, "aug.mean must have one value per channel (3)");
  check([](auto& o) { o.std = {0.2, 0.0, 0.2}; }, "aug.std must be > 0");
  check([](auto& o) { o.std = {0.2, std::numeric_limits<double>::quiet_NaN(), 0.2}; }, "aug.std must be > 0");
  check([](auto& o) { o.in_chans = 2; }, "model.in_chans must be 1 or 3");
  check([](auto& o) { o.img_size = 0; }, "model.img_size");
}
