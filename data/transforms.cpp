#include "data/transforms.h"

#include <fmt/ranges.h>

#include <algorithm>
#include <array>
#include <charconv>
#include <cmath>
#include <limits>
#include <opencv2/imgproc.hpp>

#include "common/error.h"
#include "data/random.h"

namespace vitlab {

namespace {

// ---- randomness: every draw comes from the caller's rng (data/random.h) ----

// Python's round(): halves to even.
int round_half_even(double v) { return static_cast<int>(std::nearbyint(v)); }

// timm's _randomly_negate.
double randomly_negate(double v, std::mt19937_64& rng) { return uniform(rng) > 0.5 ? -v : v; }

// ---- images ----

void check_image(const cv::Mat& image, const TransformOptions& o) {
  if (image.empty()) fail("cannot transform an empty image");
  if (image.depth() != CV_8U || image.channels() != o.in_chans)
    fail("image transforms take 8-bit images with model.in_chans = {} channels, got {} channels{}", o.in_chans,
         image.channels(), image.depth() == CV_8U ? "" : " (not 8-bit)");
}

// The per-image work below is plain loops and OpenCV, no LibTorch ops: the
// transforms run in loader threads next to the model's intra-op threads,
// where LibTorch's own parallelism would only oversubscribe the CPUs.

// ToTensor then Normalize: float [C,H,W] of (x / 255 - mean) / std.
torch::Tensor to_normalized_tensor(const cv::Mat& image, const TransformOptions& o) {
  const int c = image.channels(), h = image.rows, w = image.cols;
  torch::Tensor out = torch::empty({c, h, w}, torch::kFloat);
  float* dst = out.data_ptr<float>();
  for (int k = 0; k < c; ++k) {
    std::array<float, 256> value;
    for (int v = 0; v < 256; ++v)
      value[v] = (static_cast<float>(v) / 255.0f - static_cast<float>(o.mean[k])) / static_cast<float>(o.std[k]);
    float* plane = dst + static_cast<int64_t>(k) * h * w;
    for (int y = 0; y < h; ++y) {
      const uchar* row = image.ptr<uchar>(y);
      for (int x = 0; x < w; ++x) plane[static_cast<int64_t>(y) * w + x] = value[row[x * c + k]];
    }
  }
  return out;
}

// ---- PIL's resampling (Resample.c): antialiased, separable, 8-bit fixed point ----

constexpr int kPrecisionBits = 32 - 8 - 2;

double bilinear_filter(double x) {
  x = std::abs(x);
  return x < 1 ? 1 - x : 0;
}

double bicubic_filter(double x) {
  constexpr double a = -0.5;
  x = std::abs(x);
  if (x < 1) return ((a + 2) * x - (a + 3)) * x * x + 1;
  if (x < 2) return (((x - 5) * x + 8) * x - 4) * a;
  return 0;
}

// For each output pixel: the first input pixel, how many, and their weights.
struct Coefficients {
  int ksize;
  std::vector<int> first, count;
  std::vector<int32_t> weights;  // [out][ksize], scaled by 2^kPrecisionBits
};

// PIL's precompute_coeffs: the filter widened by the downscale factor (antialiasing), weights normalized.
Coefficients precompute_coefficients(int in_size, int out_size, double (*filter)(double), double support) {
  const double scale = static_cast<double>(in_size) / out_size;
  const double filter_scale = std::max(scale, 1.0), inverse_scale = 1.0 / filter_scale;
  support *= filter_scale;
  Coefficients c;
  c.ksize = static_cast<int>(std::ceil(support)) * 2 + 1;
  c.first.resize(out_size);
  c.count.resize(out_size);
  c.weights.assign(static_cast<size_t>(out_size) * c.ksize, 0);
  std::vector<double> k(c.ksize);
  for (int xx = 0; xx < out_size; ++xx) {
    const double center = (xx + 0.5) * scale;
    // C's (int) truncation, as PIL.
    const int xmin = std::max(static_cast<int>(center - support + 0.5), 0);
    const int n = std::min(static_cast<int>(center + support + 0.5), in_size) - xmin;
    double sum = 0;
    for (int x = 0; x < n; ++x) sum += k[x] = filter((x + xmin - center + 0.5) * inverse_scale);
    for (int x = 0; x < n; ++x) {
      const double w = (sum != 0 ? k[x] / sum : k[x]) * (1 << kPrecisionBits);
      c.weights[static_cast<size_t>(xx) * c.ksize + x] = static_cast<int32_t>(w < 0 ? w - 0.5 : w + 0.5);
    }
    c.first[xx] = xmin;
    c.count[xx] = n;
  }
  return c;
}

uchar clip8(int32_t v) {
  if (v >= (1 << kPrecisionBits << 8)) return 255;
  if (v <= 0) return 0;
  return static_cast<uchar>(v >> kPrecisionBits);
}

// Horizontal pass over rows [row0, row0 + rows): output pixel xx is the
// weighted sum of count[xx] input pixels from first[xx], rounded. Colour
// pixels take one loop over the taps for their three channels rather than
// one per channel (integer sums: the same result; the loader ran 1.05-1.13x
// faster, docs/BENCHMARKS.md).
cv::Mat resample_horizontal(const cv::Mat& in, int row0, int rows, const Coefficients& c) {
  const int ch = in.channels(), out_w = static_cast<int>(c.first.size());
  constexpr int32_t half = 1 << (kPrecisionBits - 1);
  cv::Mat out(rows, out_w, in.type());
  for (int y = 0; y < rows; ++y) {
    const uchar* src = in.ptr<uchar>(row0 + y);
    uchar* dst = out.ptr<uchar>(y);
    for (int xx = 0; xx < out_w; ++xx) {
      const int32_t* k = &c.weights[static_cast<size_t>(xx) * c.ksize];
      const uchar* p = src + c.first[xx] * ch;
      const int n = c.count[xx];
      if (ch == 3) {
        int32_t s0 = half, s1 = half, s2 = half;
        for (int x = 0; x < n; ++x) {
          s0 += p[3 * x] * k[x];
          s1 += p[3 * x + 1] * k[x];
          s2 += p[3 * x + 2] * k[x];
        }
        dst[3 * xx] = clip8(s0);
        dst[3 * xx + 1] = clip8(s1);
        dst[3 * xx + 2] = clip8(s2);
        continue;
      }
      for (int j = 0; j < ch; ++j) {
        int32_t sum = half;
        for (int x = 0; x < n; ++x) sum += p[x * ch + j] * k[x];
        dst[xx * ch + j] = clip8(sum);
      }
    }
  }
  return out;
}

// Vertical pass; `in` holds the input rows from row_offset on.
cv::Mat resample_vertical(const cv::Mat& in, int row_offset, const Coefficients& c) {
  const int out_h = static_cast<int>(c.first.size()), n = in.cols * in.channels();
  cv::Mat out(out_h, in.cols, in.type());
  std::vector<int32_t> sum(n);
  for (int yy = 0; yy < out_h; ++yy) {
    std::fill(sum.begin(), sum.end(), 1 << (kPrecisionBits - 1));
    for (int y = 0; y < c.count[yy]; ++y) {
      const uchar* src = in.ptr<uchar>(c.first[yy] - row_offset + y);
      const int32_t w = c.weights[static_cast<size_t>(yy) * c.ksize + y];
      for (int i = 0; i < n; ++i) sum[i] += src[i] * w;
    }
    uchar* dst = out.ptr<uchar>(yy);
    for (int i = 0; i < n; ++i) dst[i] = clip8(sum[i]);
  }
  return out;
}

// Image.resize as timm's PIL pipeline does it: bilinear and bicubic
// antialiased, horizontal pass first (only over the rows the vertical pass
// reads); nearest samples pixel centres (OpenCV's PIL-exact nearest).
cv::Mat resize(const cv::Mat& image, int width, int height, const std::string& interpolation) {
  if (image.cols == width && image.rows == height) return image.clone();
  if (interpolation == "nearest") {
    cv::Mat out;
    cv::resize(image, out, cv::Size(width, height), 0, 0, cv::INTER_NEAREST_EXACT);
    return out;
  }
  const bool bilinear = interpolation == "bilinear";
  auto filter = bilinear ? bilinear_filter : bicubic_filter;
  const double support = bilinear ? 1.0 : 2.0;
  const Coefficients vertical = precompute_coefficients(image.rows, height, filter, support);
  if (width == image.cols) return resample_vertical(image, 0, vertical);
  const int row0 = vertical.first.front(), row1 = vertical.first.back() + vertical.count.back();
  cv::Mat out =
      resample_horizontal(image, row0, row1 - row0, precompute_coefficients(image.cols, width, filter, support));
  return height == image.rows ? out : resample_vertical(out, row0, vertical);
}

cv::Mat hflip(const cv::Mat& image) {
  cv::Mat out;
  cv::flip(image, out, 1);
  return out;
}

// timm's RandomResizedCropAndInterpolation.get_params: 10 tries at a random
// area and log-uniform aspect ratio, else a center crop clamped to the ratio range.
cv::Rect random_resized_crop(int width, int height, const TransformOptions& o, std::mt19937_64& rng) {
  const double area = static_cast<double>(width) * height;
  const double log_lo = std::log(o.ratio[0]), log_hi = std::log(o.ratio[1]);
  for (int attempt = 0; attempt < 10; ++attempt) {
    const double target_area = uniform(rng, o.scale[0], o.scale[1]) * area;
    const double aspect = std::exp(uniform(rng, log_lo, log_hi));
    const int w = round_half_even(std::sqrt(target_area * aspect));
    const int h = round_half_even(std::sqrt(target_area / aspect));
    if (w > 0 && h > 0 && w <= width && h <= height) {
      const int top = randint(rng, 0, height - h);
      const int left = randint(rng, 0, width - w);
      return {left, top, w, h};
    }
  }
  const double in_ratio = static_cast<double>(width) / height;
  int w = width, h = height;
  if (in_ratio < o.ratio[0]) {
    h = std::clamp(round_half_even(w / o.ratio[0]), 1, height);
  } else if (in_ratio > o.ratio[1]) {
    w = std::clamp(round_half_even(h * o.ratio[1]), 1, width);
  }
  return {(width - w) / 2, (height - h) / 2, w, h};
}

// ---- PIL's ImageOps and ImageEnhance, on 8-bit grey or RGB ----

using Lut = std::array<uchar, 256>;

cv::Mat apply_lut(const cv::Mat& image, const Lut& lut) {
  cv::Mat out;
  cv::LUT(image, cv::Mat(1, 256, CV_8U, const_cast<uchar*>(lut.data())), out);
  return out;
}

// A LUT computed per channel from that channel's histogram.
template <class MakeLut>
cv::Mat per_channel_lut(const cv::Mat& image, MakeLut make_lut) {
  std::vector<cv::Mat> planes;
  cv::split(image, planes);
  for (auto& plane : planes) {
    std::array<int64_t, 256> hist{};
    for (int y = 0; y < plane.rows; ++y) {
      const uchar* row = plane.ptr<uchar>(y);
      for (int x = 0; x < plane.cols; ++x) ++hist[row[x]];
    }
    plane = apply_lut(plane, make_lut(hist));
  }
  cv::Mat out;
  cv::merge(planes, out);
  return out;
}

Lut identity_lut() {
  Lut lut;
  for (int i = 0; i < 256; ++i) lut[i] = static_cast<uchar>(i);
  return lut;
}

// ImageOps.autocontrast (cutoff 0): each channel stretched from [min, max] to [0, 255].
cv::Mat auto_contrast(const cv::Mat& image) {
  return per_channel_lut(image, [](const std::array<int64_t, 256>& hist) {
    int lo = 0, hi = 255;
    while (lo < 255 && hist[lo] == 0) ++lo;
    while (hi > 0 && hist[hi] == 0) --hi;
    if (hi <= lo) return identity_lut();
    const double scale = 255.0 / (hi - lo), offset = -lo * scale;
    Lut lut;
    for (int i = 0; i < 256; ++i) lut[i] = static_cast<uchar>(std::clamp(static_cast<int>(i * scale + offset), 0, 255));
    return lut;
  });
}

// ImageOps.equalize, whose rounding differs from cv::equalizeHist's.
cv::Mat equalize(const cv::Mat& image) {
  return per_channel_lut(image, [](const std::array<int64_t, 256>& hist) {
    int64_t total = 0, last = 0, nonzero = 0;
    for (int64_t h : hist) {
      if (h == 0) continue;
      total += h;
      last = h;
      ++nonzero;
    }
    const int64_t step = nonzero > 1 ? (total - last) / 255 : 0;
    if (step == 0) return identity_lut();
    Lut lut;
    int64_t n = step / 2;
    for (int i = 0; i < 256; ++i) {
      lut[i] = static_cast<uchar>(std::min<int64_t>(n / step, 255));
      n += hist[i];
    }
    return lut;
  });
}

cv::Mat invert(const cv::Mat& image) {
  cv::Mat out;
  cv::bitwise_not(image, out);
  return out;
}

// Keeps the top `bits` bits; 0 bits (PosterizeIncreasing at magnitude 10) is black.
cv::Mat posterize(const cv::Mat& image, int bits) {
  if (bits >= 8) return image.clone();
  const int mask = ~((1 << (8 - std::max(bits, 0))) - 1) & 0xff;
  Lut lut;
  for (int i = 0; i < 256; ++i) lut[i] = static_cast<uchar>(i & mask);
  return apply_lut(image, lut);
}

cv::Mat solarize(const cv::Mat& image, int threshold) {
  Lut lut;
  for (int i = 0; i < 256; ++i) lut[i] = static_cast<uchar>(i < threshold ? i : 255 - i);
  return apply_lut(image, lut);
}

// timm's solarize_add: `add` brightens the pixels below 128.
cv::Mat solarize_add(const cv::Mat& image, int add) {
  Lut lut;
  for (int i = 0; i < 256; ++i) lut[i] = static_cast<uchar>(i < 128 ? std::min(255, i + add) : i);
  return apply_lut(image, lut);
}

// PIL's Image.blend(degenerate, image, factor): truncated, then clipped to 8 bits.
cv::Mat blend(const cv::Mat& degenerate, const cv::Mat& image, double factor) {
  cv::Mat a, b;
  degenerate.convertTo(a, CV_32F);
  image.convertTo(b, CV_32F);
  cv::Mat mixed = a + (b - a) * factor;
  cv::Mat out(image.size(), image.type());
  const float* in = mixed.ptr<float>();
  uchar* dst = out.ptr<uchar>();
  const size_t n = out.total() * out.channels();
  for (size_t i = 0; i < n; ++i) dst[i] = in[i] <= 0 ? 0 : in[i] >= 255 ? 255 : static_cast<uchar>(in[i]);
  return out;
}

cv::Mat grey_of(const cv::Mat& image) {
  if (image.channels() == 1) return image;
  cv::Mat grey;
  cv::cvtColor(image, grey, cv::COLOR_RGB2GRAY);
  return grey;
}

// ImageEnhance.Color (saturation): towards the grey image; grey images are unchanged.
cv::Mat enhance_color(const cv::Mat& image, double factor) {
  if (image.channels() == 1) return image.clone();
  cv::Mat degenerate;
  cv::cvtColor(grey_of(image), degenerate, cv::COLOR_GRAY2RGB);
  return blend(degenerate, image, factor);
}

// ImageEnhance.Contrast: towards the rounded mean grey level.
cv::Mat enhance_contrast(const cv::Mat& image, double factor) {
  const int mean = static_cast<int>(cv::mean(grey_of(image))[0] + 0.5);
  return blend(cv::Mat(image.size(), image.type(), cv::Scalar::all(mean)), image, factor);
}

// ImageEnhance.Brightness: towards black.
cv::Mat enhance_brightness(const cv::Mat& image, double factor) {
  return blend(cv::Mat::zeros(image.size(), image.type()), image, factor);
}

// ImageEnhance.Sharpness: away from PIL's SMOOTH filter, which leaves the
// border pixels as they are.
cv::Mat enhance_sharpness(const cv::Mat& image, double factor) {
  const cv::Mat kernel = (cv::Mat_<float>(3, 3) << 1, 1, 1, 1, 5, 1, 1, 1, 1) / 13.0f;
  cv::Mat smooth;
  cv::filter2D(image, smooth, -1, kernel, cv::Point(-1, -1), 0, cv::BORDER_REPLICATE);
  const int w = image.cols, h = image.rows;
  image.row(0).copyTo(smooth.row(0));
  image.row(h - 1).copyTo(smooth.row(h - 1));
  image.col(0).copyTo(smooth.col(0));
  image.col(w - 1).copyTo(smooth.col(w - 1));
  return blend(smooth, image, factor);
}

// ---- geometric ops: PIL's Image.transform with the mean colour as fill ----

int cv_interpolation(const std::string& interpolation) {
  if (interpolation == "nearest") return cv::INTER_NEAREST;
  if (interpolation == "bilinear") return cv::INTER_LINEAR;
  return cv::INTER_CUBIC;
}

// timm's img_mean: round(255 * mean) per channel.
cv::Scalar fill_colour(const TransformOptions& o) {
  cv::Scalar fill;
  for (size_t c = 0; c < o.mean.size() && c < 4; ++c)
    fill[static_cast<int>(c)] = std::min(255.0, std::nearbyint(255 * o.mean[c]));
  return fill;
}

// PIL's affine data (a, b, c, d, e, f) maps an output point to the input
// point (a x + b y + c, d x + e y + f), pixel centres at +0.5; in pixel
// indices the offsets gain (a + b - 1) / 2 and (d + e - 1) / 2.
cv::Mat pil_affine(const cv::Mat& image, double a, double b, double c, double d, double e, double f,
                   const TransformOptions& o) {
  const cv::Matx23d inverse(a, b, c + (a + b - 1) / 2, d, e, f + (d + e - 1) / 2);
  cv::Mat out;
  cv::warpAffine(image, out, inverse, image.size(), cv_interpolation(o.interpolation) | cv::WARP_INVERSE_MAP,
                 cv::BORDER_CONSTANT, fill_colour(o));
  return out;
}

// Image.rotate: counter-clockwise in degrees about the image centre.
cv::Mat rotate(const cv::Mat& image, double degrees, const TransformOptions& o) {
  const cv::Point2f centre((image.cols - 1) / 2.0f, (image.rows - 1) / 2.0f);
  cv::Mat out;
  cv::warpAffine(image, out, cv::getRotationMatrix2D(centre, degrees, 1.0), image.size(),
                 cv_interpolation(o.interpolation), cv::BORDER_CONSTANT, fill_colour(o));
  return out;
}

// ---- RandAugment ----

const std::vector<std::string> kRandOps = {"AutoContrast", "Equalize",    "Invert", "Rotate",        "Posterize",
                                           "Solarize",     "SolarizeAdd", "Color",  "Contrast",      "Brightness",
                                           "Sharpness",    "ShearX",      "ShearY", "TranslateXRel", "TranslateYRel"};
const std::vector<std::string> kRandIncreasingOps = {"AutoContrast",
                                                     "Equalize",
                                                     "Invert",
                                                     "Rotate",
                                                     "PosterizeIncreasing",
                                                     "SolarizeIncreasing",
                                                     "SolarizeAdd",
                                                     "ColorIncreasing",
                                                     "ContrastIncreasing",
                                                     "BrightnessIncreasing",
                                                     "SharpnessIncreasing",
                                                     "ShearX",
                                                     "ShearY",
                                                     "TranslateXRel",
                                                     "TranslateYRel"};

[[noreturn]] void bad_part(const std::string& text, const std::string& part, const std::string& why) {
  fail("aug.auto_augment '{}': bad part '{}': {} (timm's RandAugment string, e.g. rand-m9-mstd0.5-inc1)", text, part,
       why);
}

template <class T>
T parse_number(const std::string& text, const std::string& part, const std::string& value) {
  T out{};
  const char* end = value.data() + value.size();
  auto [ptr, ec] = std::from_chars(value.data(), end, out);
  if (ec != std::errc() || ptr != end) bad_part(text, part, fmt::format("'{}' is not a number", value));
  return out;
}

}  // namespace

void TransformOptions::validate() const {
  if (img_size < 1) fail("model.img_size must be >= 1, got {}", img_size);
  if (in_chans != 1 && in_chans != 3) fail("model.in_chans must be 1 or 3 for image transforms, got {}", in_chans);
  if (static_cast<int64_t>(mean.size()) != in_chans)
    fail("aug.mean must have one value per channel ({}), got {}", in_chans, fmt::join(mean, ", "));
  if (static_cast<int64_t>(std.size()) != in_chans)
    fail("aug.std must have one value per channel ({}), got {}", in_chans, fmt::join(std, ", "));
  for (double m : mean)
    if (!std::isfinite(m)) fail("aug.mean must be finite, got {}", m);
  for (double s : std)
    if (!(s > 0) || !std::isfinite(s)) fail("aug.std must be > 0, got {}", s);
  if (scale.size() != 2 || !(0 < scale[0] && scale[0] <= scale[1] && scale[1] <= 1))
    fail("aug.scale must be [min, max] with 0 < min <= max <= 1, got [{}]", fmt::join(scale, ", "));
  if (ratio.size() != 2 || !(0 < ratio[0] && ratio[0] <= ratio[1] && std::isfinite(ratio[1])))
    fail("aug.ratio must be [min, max] with 0 < min <= max, got [{}]", fmt::join(ratio, ", "));
  if (interpolation != "bilinear" && interpolation != "bicubic" && interpolation != "nearest")
    fail("aug.interpolation must be one of bilinear, bicubic, nearest, got '{}'", interpolation);
  if (!(hflip >= 0 && hflip <= 1)) fail("aug.hflip must be a probability in [0, 1], got {}", hflip);
  if (!auto_augment.empty()) parse_rand_augment(auto_augment);
  if (!(color_jitter >= 0) || !std::isfinite(color_jitter))
    fail("aug.color_jitter must be >= 0 (0: off), got {}", color_jitter);
  if (!(reprob >= 0 && reprob <= 1)) fail("aug.reprob must be a probability in [0, 1], got {}", reprob);
  if (!(crop_pct > 0 && crop_pct <= 1)) fail("aug.crop_pct must be in (0, 1], got {}", crop_pct);
}

RandAugmentSpec parse_rand_augment(const std::string& text) {
  RandAugmentSpec spec;
  spec.magnitude = 10;  // timm's default when the string has no m
  std::vector<std::string> parts;
  for (size_t start = 0;;) {
    const size_t dash = text.find('-', start);
    parts.push_back(text.substr(start, dash == std::string::npos ? std::string::npos : dash - start));
    if (dash == std::string::npos) break;
    start = dash + 1;
  }
  if (parts[0] != "rand")
    fail(
        "aug.auto_augment '{}' is not supported: only timm's RandAugment strings 'rand-...' are, "
        "e.g. rand-m9-mstd0.5-inc1",
        text);
  for (size_t i = 1; i < parts.size(); ++i) {
    const std::string& part = parts[i];
    // As timm: the key is what comes before the first digit, the value the rest.
    const size_t digit = part.find_first_of("0123456789");
    if (digit == std::string::npos || digit == 0) bad_part(text, part, "expected a key and a number, e.g. m9");
    const std::string key = part.substr(0, digit), value = part.substr(digit);
    if (key == "m") {
      spec.magnitude = parse_number<int>(text, part, value);
    } else if (key == "n") {
      spec.num_ops = parse_number<int>(text, part, value);
      if (spec.num_ops < 1) bad_part(text, part, "n must be >= 1");
    } else if (key == "mstd") {
      spec.magnitude_std = parse_number<double>(text, part, value);
      if (spec.magnitude_std > 100) spec.magnitude_std = std::numeric_limits<double>::infinity();
    } else if (key == "p") {
      spec.prob = parse_number<double>(text, part, value);
      if (spec.prob > 1) bad_part(text, part, "p must be a probability in [0, 1]");
    } else if (key == "inc") {
      spec.increasing = parse_number<int>(text, part, value) != 0;
    } else {
      bad_part(text, part, fmt::format("unknown key '{}' (known: m, n, mstd, p, inc)", key));
    }
  }
  return spec;
}

const std::vector<std::string>& rand_augment_ops(bool increasing) { return increasing ? kRandIncreasingOps : kRandOps; }

cv::Mat augment_op(const cv::Mat& image, const std::string& name, double magnitude, const TransformOptions& options,
                   std::mt19937_64& rng) {
  const double level = magnitude / 10.0;  // timm's _LEVEL_DENOM
  // timm's level-to-argument functions, per op.
  auto enhance = [&](bool increasing) {
    return increasing ? std::max(0.1, 1.0 + randomly_negate(level * 0.9, rng)) : level * 1.8 + 0.1;
  };
  const int width = image.cols, height = image.rows;
  if (name == "AutoContrast") return auto_contrast(image);
  if (name == "Equalize") return equalize(image);
  if (name == "Invert") return invert(image);
  if (name == "Rotate") return rotate(image, randomly_negate(level * 30, rng), options);
  if (name == "Posterize") return posterize(image, static_cast<int>(level * 4));
  if (name == "PosterizeIncreasing") return posterize(image, 4 - static_cast<int>(level * 4));
  if (name == "Solarize") return solarize(image, static_cast<int>(level * 256));
  if (name == "SolarizeIncreasing") return solarize(image, 256 - static_cast<int>(level * 256));
  if (name == "SolarizeAdd") return solarize_add(image, static_cast<int>(level * 110));
  if (name == "Color" || name == "ColorIncreasing") return enhance_color(image, enhance(name != "Color"));
  if (name == "Contrast" || name == "ContrastIncreasing") return enhance_contrast(image, enhance(name != "Contrast"));
  if (name == "Brightness" || name == "BrightnessIncreasing")
    return enhance_brightness(image, enhance(name != "Brightness"));
  if (name == "Sharpness" || name == "SharpnessIncreasing")
    return enhance_sharpness(image, enhance(name != "Sharpness"));
  if (name == "ShearX") return pil_affine(image, 1, randomly_negate(level * 0.3, rng), 0, 0, 1, 0, options);
  if (name == "ShearY") return pil_affine(image, 1, 0, 0, randomly_negate(level * 0.3, rng), 1, 0, options);
  if (name == "TranslateXRel")
    return pil_affine(image, 1, 0, randomly_negate(level * 0.45, rng) * width, 0, 1, 0, options);
  if (name == "TranslateYRel")
    return pil_affine(image, 1, 0, 0, 0, 1, randomly_negate(level * 0.45, rng) * height, options);
  fail("unknown RandAugment op '{}'; known: {} and their *Increasing variants", name, fmt::join(kRandOps, ", "));
}

cv::Mat rand_augment(const cv::Mat& image, const RandAugmentSpec& spec, const TransformOptions& options,
                     std::mt19937_64& rng) {
  const auto& ops = rand_augment_ops(spec.increasing);
  cv::Mat img = image;
  for (int i = 0; i < spec.num_ops; ++i) {
    const std::string& name = ops[randint(rng, 0, static_cast<int>(ops.size()) - 1)];
    // timm's AugmentOp: the probability first, then the magnitude's noise.
    if (spec.prob < 1 && uniform(rng) > spec.prob) continue;
    double magnitude = spec.magnitude;
    if (std::isinf(spec.magnitude_std))
      magnitude = uniform(rng, 0, magnitude);
    else if (spec.magnitude_std > 0)
      magnitude = std::normal_distribution<double>(magnitude, spec.magnitude_std)(rng);
    img = augment_op(img, name, std::clamp(magnitude, 0.0, 10.0), options, rng);
  }
  return img;
}

torch::Tensor train_transform(const cv::Mat& image, const TransformOptions& options, std::mt19937_64& rng) {
  options.validate();
  check_image(image, options);
  const auto size = static_cast<int>(options.img_size);
  cv::Mat img =
      resize(image(random_resized_crop(image.cols, image.rows, options, rng)), size, size, options.interpolation);
  if (options.hflip > 0 && uniform(rng) < options.hflip) img = hflip(img);
  if (!options.auto_augment.empty()) {
    img = rand_augment(img, parse_rand_augment(options.auto_augment), options, rng);
  } else if (options.color_jitter > 0) {
    // torchvision's ColorJitter on PIL images: factors from [max(0, 1 - j), 1 + j], applied in a random order.
    std::array<int, 3> order = {0, 1, 2};
    std::shuffle(order.begin(), order.end(), rng);
    const double lo = std::max(0.0, 1 - options.color_jitter), hi = 1 + options.color_jitter;
    const double brightness = uniform(rng, lo, hi), contrast = uniform(rng, lo, hi), saturation = uniform(rng, lo, hi);
    for (int op : order)
      img = op == 0   ? enhance_brightness(img, brightness)
            : op == 1 ? enhance_contrast(img, contrast)
                      : enhance_color(img, saturation);
  }
  torch::Tensor x = to_normalized_tensor(img, options);
  // timm's RandomErasing (mode 'pixel', one box): 2% to 1/3 of the area, aspect ratio log-uniform in [0.3, 1/0.3].
  if (options.reprob > 0 && !(uniform(rng) > options.reprob)) {
    const int c = img.channels(), h_img = img.rows, w_img = img.cols;
    const double area = static_cast<double>(h_img) * w_img;
    for (int attempt = 0; attempt < 10; ++attempt) {
      const double target_area = uniform(rng, 0.02, 1.0 / 3.0) * area;
      const double aspect = std::exp(uniform(rng, std::log(0.3), std::log(1 / 0.3)));
      const int h = round_half_even(std::sqrt(target_area * aspect));
      const int w = round_half_even(std::sqrt(target_area / aspect));
      if (w < w_img && h < h_img) {
        const int top = randint(rng, 0, h_img - h);
        const int left = randint(rng, 0, w_img - w);
        std::normal_distribution<float> normal;
        float* data = x.data_ptr<float>();
        for (int k = 0; k < c; ++k)
          for (int y = top; y < top + h; ++y)
            for (int i = left; i < left + w; ++i) data[(static_cast<int64_t>(k) * h_img + y) * w_img + i] = normal(rng);
        break;
      }
    }
  }
  return x;
}

torch::Tensor eval_transform(const cv::Mat& image, const TransformOptions& options) {
  options.validate();
  check_image(image, options);
  // torchvision's Resize(int): the short side to scale_size, the long side in proportion (truncated).
  const double scale_size = std::floor(options.img_size / options.crop_pct);
  const bool wide = image.cols > image.rows;
  const double short_side = wide ? image.rows : image.cols, long_side = wide ? image.cols : image.rows;
  const auto new_short = static_cast<int>(scale_size);
  const auto new_long = static_cast<int>(scale_size * long_side / short_side);
  cv::Mat img = resize(image, wide ? new_long : new_short, wide ? new_short : new_long, options.interpolation);
  // CenterCrop: offsets rounded half to even, as Python's round.
  const auto size = static_cast<int>(options.img_size);
  const auto top = static_cast<int>(std::nearbyint((img.rows - size) / 2.0));
  const auto left = static_cast<int>(std::nearbyint((img.cols - size) / 2.0));
  return to_normalized_tensor(img(cv::Rect(left, top, size, size)), options);
}

}  // namespace vitlab
