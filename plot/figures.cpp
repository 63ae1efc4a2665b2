#include "plot/figures.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include "common/error.h"

namespace vitlab {

namespace {

// Hershey simplex's capital height is about 21 px at scale 1: titles ~15 px,
// axis labels ~12 px, tick labels ~10 px.
struct Font {
  double scale;
  int thickness;
};
constexpr int kFace = cv::FONT_HERSHEY_SIMPLEX;
constexpr Font kTitle{0.7, 1};
constexpr Font kSubtitle{0.5, 1};
constexpr Font kLabel{0.55, 1};
constexpr Font kTick{0.45, 1};
constexpr int kMargin = 14;
const cv::Scalar kBlack{0, 0, 0}, kDark{70, 70, 70}, kWhite{255, 255, 255}, kGridLine{225, 225, 225};
const cv::Vec3b kNanColour{200, 200, 200};

// Width and full height (ascent + descent) of a text line.
cv::Size text_size(const std::string& text, Font f) {
  int baseline = 0;
  cv::Size s = cv::getTextSize(text, kFace, f.scale, f.thickness, &baseline);
  return {s.width, s.height + baseline};
}

// halign: -1 left, 0 centre, 1 right of anchor.x; valign: -1 top, 0 middle,
// 1 bottom at anchor.y (of the full line box, descenders included).
void draw_text(cv::Mat& img, const std::string& text, cv::Point anchor, Font f, int halign, int valign,
               const cv::Scalar& colour = kBlack) {
  if (text.empty()) return;
  int baseline = 0;
  cv::Size s = cv::getTextSize(text, kFace, f.scale, f.thickness, &baseline);
  const int full = s.height + baseline;
  const int x = anchor.x - (halign == 0 ? s.width / 2 : halign > 0 ? s.width : 0);
  const int top = anchor.y - (valign == 0 ? full / 2 : valign > 0 ? full : 0);
  cv::putText(img, text, {x, top + s.height}, kFace, f.scale, colour, f.thickness, cv::LINE_AA);
}

// Text read bottom to top (a y-axis label), centred on `centre`; dark text
// over a light background (combined with min so it never paints a box).
void draw_text_vertical(cv::Mat& img, const std::string& text, cv::Point centre, Font f,
                        const cv::Scalar& colour = kBlack) {
  if (text.empty()) return;
  cv::Size s = text_size(text, f);
  cv::Mat line(s.height + 2, s.width + 2, CV_8UC3, kWhite), rotated;
  draw_text(line, text, {1, 1}, f, -1, -1, colour);
  cv::rotate(line, rotated, cv::ROTATE_90_COUNTERCLOCKWISE);
  cv::Rect target(centre.x - rotated.cols / 2, centre.y - rotated.rows / 2, rotated.cols, rotated.rows);
  cv::Rect clipped = target & cv::Rect(0, 0, img.cols, img.rows);
  if (clipped.empty()) return;
  cv::Mat src = rotated(cv::Rect(clipped.x - target.x, clipped.y - target.y, clipped.width, clipped.height));
  cv::Mat dst = img(clipped);
  cv::min(dst, src, dst);
}

// Text read bottom to top whose end is at `top_centre` (a rotated column tick label hanging under an axis).
void draw_text_vertical_from_top(cv::Mat& img, const std::string& text, cv::Point top_centre, Font f) {
  cv::Size s = text_size(text, f);
  draw_text_vertical(img, text, {top_centre.x, top_centre.y + s.width / 2 + 1}, f);
}

std::string format_value(double v, int decimals) {
  if (std::isnan(v)) return "nan";
  std::string s = fmt::format("{:.{}f}", v, decimals);
  if (s == "-" + fmt::format("{:.{}f}", 0.0, decimals)) s = s.substr(1);  // no "-0.00"
  return s;
}

// Decimals that tell colour-bar ticks over a range apart.
int decimals_for_range(double range) {
  if (!(range > 0)) return 2;
  return std::clamp(2 - static_cast<int>(std::floor(std::log10(range))), 0, 5);
}

// Decimals that show every multiple of step exactly (0.25 -> 2, 5 -> 0).
int decimals_for_step(double step) {
  for (int d = 0; d < 6; ++d) {
    const double scaled = step * std::pow(10.0, d);
    if (std::abs(scaled - std::round(scaled)) < 1e-6 * std::max(1.0, scaled)) return d;
  }
  return 6;
}

// A 1-2-5 step near range / target_ticks.
double nice_step(double range, int target_ticks) {
  if (!(range > 0)) return 1.0;
  const double raw = range / target_ticks;
  const double mag = std::pow(10.0, std::floor(std::log10(raw)));
  for (double m : {1.0, 2.0, 2.5, 5.0, 10.0})
    if (raw <= m * mag) return m * mag;
  return 10.0 * mag;
}

torch::Tensor to_cpu_double(const torch::Tensor& t) { return t.detach().to(torch::kCPU, torch::kDouble).contiguous(); }

// The finite values' range, widened when flat; `fixed_*` win when given.
std::pair<double, double> value_range(const torch::Tensor& values, std::optional<double> fixed_min,
                                      std::optional<double> fixed_max) {
  double lo = std::numeric_limits<double>::infinity(), hi = -lo;
  const double* p = values.data_ptr<double>();
  for (int64_t i = 0; i < values.numel(); ++i)
    if (std::isfinite(p[i])) {
      lo = std::min(lo, p[i]);
      hi = std::max(hi, p[i]);
    }
  if (!std::isfinite(lo)) {
    lo = 0.0;
    hi = 1.0;
  }
  if (fixed_min) lo = *fixed_min;
  if (fixed_max) hi = *fixed_max;
  if (!(hi > lo)) {
    // A flat map: give it a unit range rather than divide by zero.
    if (fixed_min && !fixed_max) {
      hi = lo + 1.0;
    } else if (fixed_max && !fixed_min) {
      lo = hi - 1.0;
    } else {
      lo -= 0.5;
      hi += 0.5;
    }
  }
  return {lo, hi};
}

// Values [R, C] (double, CPU) to viridis colours, one pixel per value.
cv::Mat colorize(const torch::Tensor& values, double vmin, double vmax) {
  const int R = static_cast<int>(values.size(0)), C = static_cast<int>(values.size(1));
  cv::Mat levels(R, C, CV_8U);
  const double* p = values.data_ptr<double>();
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < C; ++j) {
      const double v = p[i * C + j];
      const double t = std::isfinite(v) ? std::clamp((v - vmin) / (vmax - vmin), 0.0, 1.0) : 0.0;
      levels.at<uint8_t>(i, j) = static_cast<uint8_t>(std::lround(255.0 * t));
    }
  cv::Mat colours;
  cv::applyColorMap(levels, colours, cv::COLORMAP_VIRIDIS);
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < C; ++j)
      if (!std::isfinite(p[i * C + j])) colours.at<cv::Vec3b>(i, j) = kNanColour;
  return colours;
}

std::vector<std::string> tick_labels(const std::vector<std::string>& given, int64_t n, int64_t start,
                                     const char* what) {
  if (!given.empty()) {
    if (static_cast<int64_t>(given.size()) != n)
      fail("heatmap: {} tick labels for {} {}s; give one per {} or none", given.size(), n, what, what);
    return given;
  }
  std::vector<std::string> labels;
  for (int64_t i = 0; i < n; ++i) labels.push_back(std::to_string(start + i));
  return labels;
}

// Labels every `step` cells so that neighbours do not overlap; steps go
// 1, 2, 5, 10, 20, ... so that index labels read as round numbers.
int label_step(int needed_px, int cell) {
  const int raw = std::max(1, (needed_px + cell - 1) / cell);
  for (int step = 1;; step *= 10)
    for (int m : {1, 2, 5})
      if (m * step >= raw) return m * step;
}

// One matrix with its tick labels and axis labels (no title, no colour bar).
struct MatrixBlock {
  cv::Mat image;
  cv::Rect matrix;  // where the cells are inside image
};

struct BlockStyle {
  int cell = 20;
  std::vector<std::string> row_labels, col_labels;
  std::string x_label, y_label, panel_title;
  bool annotate = true;
  int decimals = 2;
};

MatrixBlock matrix_block(const torch::Tensor& values, double vmin, double vmax, const BlockStyle& s) {
  const int R = static_cast<int>(values.size(0)), C = static_cast<int>(values.size(1)), cell = s.cell;
  const int tick_h = text_size("0", kTick).height;

  int row_w = 0, col_w = 0;
  for (const auto& l : s.row_labels) row_w = std::max(row_w, text_size(l, kTick).width);
  for (const auto& l : s.col_labels) col_w = std::max(col_w, text_size(l, kTick).width);
  const int row_step = label_step(tick_h + 3, cell);
  // Column labels lie flat unless standing up lets more of them show (long
  // class names under narrow cells); short ones (block numbers) stay flat.
  const int flat_step = label_step(col_w + 6, cell), standing_step = label_step(tick_h + 3, cell);
  const bool flat_cols = flat_step <= standing_step || col_w <= 2 * tick_h;
  const int col_step = flat_cols ? flat_step : standing_step;
  const int col_band = flat_cols ? tick_h + 6 : col_w + 8;
  const int label_h = text_size("Ag", kLabel).height;

  const int title_band = s.panel_title.empty() ? 0 : text_size("Ag", kLabel).height + 6;
  const int ylabel_band = s.y_label.empty() ? 0 : label_h + 6;
  const int xlabel_band = s.x_label.empty() ? 0 : label_h + 6;
  const int mw = C * cell, mh = R * cell;
  // The x label and panel title are centred on the matrix: a wide one moves
  // the matrix right and widens the block so neither is clipped.
  const int centred_w = std::max(text_size(s.x_label, kLabel).width, text_size(s.panel_title, kLabel).width) + 4;
  int left = ylabel_band + row_w + 6;
  left += std::max(0, centred_w / 2 - (left + mw / 2));
  const int top = title_band + 2;
  // Flat column labels at the last cell may reach past the matrix edge.
  const int right_pad = flat_cols ? std::max(2, col_w / 2 - cell / 2 + 2) : 2;
  const int width = std::max(left + mw + right_pad, left + mw / 2 + centred_w / 2 + 1);
  const int height = top + mh + 4 + col_band + xlabel_band + 2;

  MatrixBlock b;
  b.image = cv::Mat(height, width, CV_8UC3, kWhite);
  b.matrix = cv::Rect(left, top, mw, mh);
  cv::Mat colours = colorize(values, vmin, vmax), cells;
  cv::resize(colours, cells, cv::Size(mw, mh), 0, 0, cv::INTER_NEAREST);
  cells.copyTo(b.image(b.matrix));

  if (!s.panel_title.empty()) draw_text(b.image, s.panel_title, {left + mw / 2, 0}, kLabel, 0, -1);
  for (int i = 0; i < R; i += row_step)
    draw_text(b.image, s.row_labels[i], {left - 5, top + i * cell + cell / 2}, kTick, 1, 0);
  for (int j = 0; j < C; j += col_step) {
    const int x = left + j * cell + cell / 2;
    if (flat_cols)
      draw_text(b.image, s.col_labels[j], {x, top + mh + 4}, kTick, 0, -1);
    else
      draw_text_vertical_from_top(b.image, s.col_labels[j], {x, top + mh + 4}, kTick);
  }
  if (!s.y_label.empty()) draw_text_vertical(b.image, s.y_label, {label_h / 2 + 1, top + mh / 2}, kLabel);
  if (!s.x_label.empty()) draw_text(b.image, s.x_label, {left + mw / 2, top + mh + 4 + col_band}, kLabel, 0, -1);

  if (s.annotate) {
    // The largest of a few font sizes whose widest value fits the cells.
    const double* p = values.data_ptr<double>();
    std::string widest;
    for (int64_t i = 0; i < values.numel(); ++i) {
      std::string v = format_value(p[i], s.decimals);
      if (v.size() > widest.size()) widest = v;
    }
    for (double scale : {0.5, 0.45, 0.4}) {
      const Font f{scale, 1};
      const cv::Size ts = text_size(widest, f);
      if (ts.width + 6 > cell || ts.height + 4 > cell) continue;  // room between neighbouring values
      for (int i = 0; i < R; ++i)
        for (int j = 0; j < C; ++j) {
          const double v = p[i * C + j];
          // Viridis is dark below the middle: white text there.
          const double t = std::isfinite(v) ? (v - vmin) / (vmax - vmin) : 1.0;
          draw_text(b.image, format_value(v, s.decimals), {left + j * cell + cell / 2, top + i * cell + cell / 2}, f, 0,
                    0, t < 0.55 ? kWhite : kBlack);
        }
      break;
    }
  }
  return b;
}

// A vertical colour bar `bar_h` pixels high with tick labels; the bar's top
// sits `pad` pixels down so the top label is not clipped.
struct ColourBar {
  cv::Mat image;
  int pad = 0;
};

ColourBar colour_bar(double vmin, double vmax, int bar_h) {
  constexpr int kBarW = 16;
  const int tick_h = text_size("0", kTick).height;
  // Round values (a 1-2-5 step) inside the range; the ends too when the
  // range has fewer than two of them.
  const double step = nice_step(vmax - vmin, bar_h >= 120 ? 5 : 2);
  std::vector<double> values;
  for (double v = std::ceil(vmin / step - 1e-9) * step; v <= vmax + step * 1e-9; v += step)
    values.push_back(std::abs(v) < step * 1e-9 ? 0.0 : v);
  if (values.size() < 2) values = {vmin, vmax};
  const int decimals =
      values.size() == 2 && values[0] == vmin ? decimals_for_range(vmax - vmin) : decimals_for_step(step);
  std::vector<std::pair<double, std::string>> labels;
  int label_w = 0;
  for (double v : values) {
    labels.emplace_back(v, format_value(v, decimals));
    label_w = std::max(label_w, text_size(labels.back().second, kTick).width);
  }
  ColourBar cb;
  cb.pad = tick_h / 2 + 2;
  cb.image = cv::Mat(bar_h + 2 * cb.pad, kBarW + 6 + label_w + 2, CV_8UC3, kWhite);
  cv::Mat levels(bar_h, 1, CV_8U), colours;
  for (int y = 0; y < bar_h; ++y)
    levels.at<uint8_t>(y, 0) = static_cast<uint8_t>(std::lround(255.0 * (bar_h - 1 - y) / std::max(bar_h - 1, 1)));
  cv::applyColorMap(levels, colours, cv::COLORMAP_VIRIDIS);
  cv::resize(colours, colours, cv::Size(kBarW, bar_h), 0, 0, cv::INTER_NEAREST);
  colours.copyTo(cb.image(cv::Rect(0, cb.pad, kBarW, bar_h)));
  cv::rectangle(cb.image, cv::Rect(0, cb.pad, kBarW, bar_h), kDark, 1);
  for (const auto& [v, text] : labels) {
    const int y = cb.pad + static_cast<int>(std::lround((1.0 - (v - vmin) / (vmax - vmin)) * (bar_h - 1)));
    cv::line(cb.image, {kBarW, y}, {kBarW + 3, y}, kDark, 1);
    draw_text(cb.image, text, {kBarW + 6, y}, kTick, -1, 0);
  }
  return cb;
}

// A title (and subtitle) band over `body`, centred; the figure is at least
// min_width wide and has a white margin all round.
cv::Mat with_title(const cv::Mat& body, const std::string& title, const std::string& subtitle, int min_width = 0) {
  const int title_h = title.empty() ? 0 : text_size(title, kTitle).height + 8;
  const int sub_h = subtitle.empty() ? 0 : text_size(subtitle, kSubtitle).height + 6;
  const int width = std::max({body.cols + 2 * kMargin, text_size(title, kTitle).width + 2 * kMargin,
                              text_size(subtitle, kSubtitle).width + 2 * kMargin, min_width});
  const int height = kMargin + title_h + sub_h + (title_h + sub_h > 0 ? 8 : 0) + body.rows + kMargin;
  cv::Mat fig(height, width, CV_8UC3, kWhite);
  int y = kMargin;
  if (!title.empty()) {
    draw_text(fig, title, {width / 2, y}, kTitle, 0, -1);
    y += title_h;
  }
  if (!subtitle.empty()) {
    draw_text(fig, subtitle, {width / 2, y}, kSubtitle, 0, -1, kDark);
    y += sub_h;
  }
  if (title_h + sub_h > 0) y += 8;
  body.copyTo(fig(cv::Rect((width - body.cols) / 2, y, body.cols, body.rows)));
  return fig;
}

void paste(cv::Mat& canvas, const cv::Mat& image, int x, int y) {
  image.copyTo(canvas(cv::Rect(x, y, image.cols, image.rows)));
}

}  // namespace

std::string encode_png(const cv::Mat& image) {
  std::vector<uchar> png;
  if (!cv::imencode(".png", image, png)) fail("cannot encode a {}x{} image as PNG", image.cols, image.rows);
  return std::string(png.begin(), png.end());
}

cv::Mat heatmap_image(const torch::Tensor& matrix, const HeatmapOptions& o) {
  TORCH_CHECK(matrix.dim() == 2 && matrix.size(0) > 0 && matrix.size(1) > 0,
              "heatmap: expected a non-empty matrix [R, C], got shape ", matrix.sizes());
  torch::Tensor values = to_cpu_double(matrix);
  const auto [vmin, vmax] = value_range(values, o.vmin, o.vmax);
  const int64_t R = values.size(0), C = values.size(1);
  BlockStyle s;
  s.cell = o.cell > 0 ? o.cell : std::clamp(static_cast<int>(480 / std::max(R, C)), 6, 64);
  s.row_labels = tick_labels(o.row_labels, R, o.tick_start, "row");
  s.col_labels = tick_labels(o.col_labels, C, o.tick_start, "column");
  s.x_label = o.x_label;
  s.y_label = o.y_label;
  s.annotate = o.annotate;
  s.decimals = o.value_decimals;
  MatrixBlock block = matrix_block(values, vmin, vmax, s);
  cv::Mat body = block.image;
  if (o.colorbar) {
    ColourBar cb = colour_bar(vmin, vmax, block.matrix.height);
    const int gap = 18;
    const int top = std::max(0, cb.pad - block.matrix.y);  // room for the bar's top label
    cv::Mat joined(std::max(block.image.rows + top, block.matrix.y + top - cb.pad + cb.image.rows),
                   block.image.cols + gap + cb.image.cols, CV_8UC3, kWhite);
    paste(joined, block.image, 0, top);
    paste(joined, cb.image, block.image.cols + gap, block.matrix.y + top - cb.pad);
    body = joined;
  }
  return with_title(body, o.title, o.subtitle, o.min_width);
}

std::string heatmap_png(const torch::Tensor& matrix, const HeatmapOptions& options) {
  return encode_png(heatmap_image(matrix, options));
}

cv::Mat heatmap_grid_image(const torch::Tensor& matrices, const HeatmapGridOptions& o) {
  TORCH_CHECK(matrices.dim() == 3 && matrices.size(0) > 0 && matrices.size(1) > 0 && matrices.size(2) > 0,
              "heatmap grid: expected matrices [N, R, C], got shape ", matrices.sizes());
  torch::Tensor values = to_cpu_double(matrices);
  const int64_t N = values.size(0), R = values.size(1), C = values.size(2);
  if (!o.panel_titles.empty() && static_cast<int64_t>(o.panel_titles.size()) != N)
    fail("heatmap grid: {} panel titles for {} matrices", o.panel_titles.size(), N);
  const auto [vmin, vmax] = value_range(values, o.vmin, o.vmax);
  const int columns = o.columns > 0 ? o.columns : static_cast<int>(std::ceil(std::sqrt(static_cast<double>(N))));
  const int rows = static_cast<int>((N + columns - 1) / columns);
  const int panel = o.panel > 0 ? o.panel : 180;

  BlockStyle s;
  s.cell = std::max(2, static_cast<int>(panel / std::max(R, C)));
  s.row_labels = tick_labels({}, R, o.tick_start, "row");
  s.col_labels = tick_labels({}, C, o.tick_start, "column");
  s.x_label = o.x_label;
  s.y_label = o.y_label;
  s.annotate = o.annotate;
  s.decimals = o.value_decimals;
  std::vector<MatrixBlock> blocks;
  int bw = 0, bh = 0;
  for (int64_t n = 0; n < N; ++n) {
    s.panel_title = o.panel_titles.empty() ? "" : o.panel_titles[n];
    blocks.push_back(matrix_block(values[n], vmin, vmax, s));
    bw = std::max(bw, blocks.back().image.cols);
    bh = std::max(bh, blocks.back().image.rows);
  }
  const int gap = 16;
  ColourBar cb = colour_bar(vmin, vmax, std::max(blocks[0].matrix.height, 60));
  const int grid_w = columns * bw + (columns - 1) * gap, grid_h = rows * bh + (rows - 1) * gap;
  const int top = std::max(0, cb.pad - blocks[0].matrix.y);
  cv::Mat body(std::max(grid_h + top, blocks[0].matrix.y + top - cb.pad + cb.image.rows),
               grid_w + 2 * gap + cb.image.cols, CV_8UC3, kWhite);
  for (int64_t n = 0; n < N; ++n) {
    const int r = static_cast<int>(n / columns), c = static_cast<int>(n % columns);
    paste(body, blocks[n].image, c * (bw + gap), top + r * (bh + gap));
  }
  paste(body, cb.image, grid_w + 2 * gap, blocks[0].matrix.y + top - cb.pad);
  return with_title(body, o.title, o.subtitle);
}

std::string heatmap_grid_png(const torch::Tensor& matrices, const HeatmapGridOptions& options) {
  return encode_png(heatmap_grid_image(matrices, options));
}

namespace {
// A point's error bar half-length; 0 when the series has none or it is not finite.
double error_bar(const LineSeries& s, size_t i) {
  return i < s.err.size() && std::isfinite(s.err[i]) ? std::abs(s.err[i]) : 0.0;
}
}  // namespace

cv::Mat line_plot_image(const std::vector<LineSeries>& series, const LinePlotOptions& o) {
  // tab10, in BGR.
  static const std::vector<cv::Scalar> palette = {{180, 119, 31},  {14, 127, 255}, {44, 160, 44},   {40, 39, 214},
                                                  {189, 103, 148}, {75, 86, 140},  {194, 119, 227}, {127, 127, 127},
                                                  {34, 189, 188},  {207, 190, 23}};
  double xlo = std::numeric_limits<double>::infinity(), xhi = -xlo, ylo = xlo, yhi = -xlo;
  for (const auto& s : series) {
    if (s.x.size() != s.y.size())
      fail("line plot: series '{}' has {} x values and {} y values", s.label, s.x.size(), s.y.size());
    if (!s.err.empty() && s.err.size() != s.y.size())
      fail("line plot: series '{}' has {} error bars for {} y values (expected one per value, or none)", s.label,
           s.err.size(), s.y.size());
    for (size_t i = 0; i < s.x.size(); ++i) {
      if (!std::isfinite(s.x[i]) || !std::isfinite(s.y[i])) continue;
      const double e = error_bar(s, i);
      xlo = std::min(xlo, s.x[i]);
      xhi = std::max(xhi, s.x[i]);
      ylo = std::min(ylo, s.y[i] - e);
      yhi = std::max(yhi, s.y[i] + e);
    }
  }
  if (!std::isfinite(xlo)) {
    xlo = ylo = 0.0;
    xhi = yhi = 1.0;
  }
  if (o.threshold) {
    ylo = std::min(ylo, *o.threshold);
    yhi = std::max(yhi, *o.threshold);
  }
  if (o.ymin) ylo = *o.ymin;
  if (o.ymax) yhi = *o.ymax;
  // A flat range gets room, relative to its values so that the ticks advance
  // (y + step != y) around a value such as 1e27.
  const double magnitude = std::max(std::abs(ylo), std::abs(yhi));
  if (!(yhi - ylo > 1e-6 * magnitude)) {
    const double room = std::max(0.5, 0.05 * magnitude);
    ylo -= room;
    yhi += room;
  }
  const double ystep = nice_step(yhi - ylo, 5);
  if (!o.ymin) ylo = std::floor(ylo / ystep + 1e-9) * ystep;
  if (!o.ymax) yhi = std::ceil(yhi / ystep - 1e-9) * ystep;
  const double x_magnitude = std::max(std::abs(xlo), std::abs(xhi));
  if (!(xhi - xlo > 1e-6 * x_magnitude)) {
    const double room = std::max(1.0, 0.05 * x_magnitude);
    xlo -= room;
    xhi += room;
  }
  const double xpad = o.integer_x ? 0.5 : 0.0;
  const double x0 = xlo - xpad, x1 = xhi + xpad;

  // Legend entries, to the right of the axes.
  std::vector<std::pair<std::string, int>> legend;  // label, palette index (-1: threshold)
  for (size_t i = 0; i < series.size(); ++i)
    if (!series[i].label.empty()) legend.emplace_back(series[i].label, static_cast<int>(i));
  if (o.threshold && !o.threshold_label.empty()) legend.emplace_back(o.threshold_label, -1);
  int legend_w = 0;
  for (const auto& entry : legend) legend_w = std::max(legend_w, text_size(entry.first, kTick).width + 40);
  if (legend_w > 0) legend_w += 12;

  const int y_decimals = decimals_for_step(ystep);
  std::vector<double> yticks;
  for (double v = std::ceil(ylo / ystep - 1e-9) * ystep; v <= yhi + ystep * 1e-6; v += ystep) yticks.push_back(v);
  int ytick_w = 0;
  for (double v : yticks) ytick_w = std::max(ytick_w, text_size(format_value(v, y_decimals), kTick).width);

  const int label_h = text_size("Ag", kLabel).height, tick_h = text_size("0", kTick).height;
  const int title_h = o.title.empty() ? 0 : text_size(o.title, kTitle).height + 8;
  const int sub_h = o.subtitle.empty() ? 0 : text_size(o.subtitle, kSubtitle).height + 6;
  const int width = std::max(
      {o.width, text_size(o.title, kTitle).width + 2 * kMargin, text_size(o.subtitle, kSubtitle).width + 2 * kMargin});
  const int left = kMargin + (o.y_label.empty() ? 0 : label_h + 8) + ytick_w + 8;
  const int right = width - kMargin - legend_w;
  const int top = kMargin + title_h + sub_h + 12;
  const int bottom = o.height - kMargin - (o.x_label.empty() ? 0 : label_h + 6) - tick_h - 8;
  if (right - left < 80 || bottom - top < 60) fail("line plot: {}x{} is too small for its labels", width, o.height);

  cv::Mat img(o.height, width, CV_8UC3, kWhite);
  auto px = [&](double x) { return left + static_cast<int>(std::lround((x - x0) / (x1 - x0) * (right - left))); };
  auto py = [&](double y) { return bottom - static_cast<int>(std::lround((y - ylo) / (yhi - ylo) * (bottom - top))); };

  if (!o.title.empty()) draw_text(img, o.title, {width / 2, kMargin}, kTitle, 0, -1);
  if (!o.subtitle.empty()) draw_text(img, o.subtitle, {width / 2, kMargin + title_h}, kSubtitle, 0, -1, kDark);

  for (double v : yticks) {
    const int yy = py(v);
    cv::line(img, {left, yy}, {right, yy}, kGridLine, 1);
    cv::line(img, {left - 4, yy}, {left, yy}, kDark, 1);
    draw_text(img, format_value(v, y_decimals), {left - 7, yy}, kTick, 1, 0);
  }
  // x ticks: the smallest 1-2-5 step whose labels do not collide.
  const int xlabel_w = std::max(text_size(format_value(xhi, o.integer_x ? 0 : 2), kTick).width,
                                text_size(format_value(xlo, o.integer_x ? 0 : 2), kTick).width);
  const int max_ticks = std::clamp((right - left) / (xlabel_w + 14), 2, 12);
  double xstep = nice_step(xhi - xlo, max_ticks);
  if (o.integer_x) xstep = std::max(1.0, xstep);
  while ((xhi - xlo) / xstep + 1 > max_ticks + 1e-9 || (o.integer_x && xstep != std::round(xstep)))
    xstep = nice_step(xstep * 1.01, 1);
  for (double v = std::ceil(xlo / xstep - 1e-9) * xstep; v <= xhi + 1e-9; v += xstep) {
    const int xx = px(v);
    cv::line(img, {xx, bottom}, {xx, bottom + 4}, kDark, 1);
    draw_text(img, format_value(v, o.integer_x ? 0 : decimals_for_step(xstep)), {xx, bottom + 6}, kTick, 0, -1);
  }
  if (!o.x_label.empty()) draw_text(img, o.x_label, {(left + right) / 2, bottom + tick_h + 12}, kLabel, 0, -1);
  if (!o.y_label.empty()) draw_text_vertical(img, o.y_label, {kMargin + label_h / 2, (top + bottom) / 2}, kLabel);

  const cv::Scalar threshold_colour{60, 60, 60};
  auto dashed = [&](cv::Point a, cv::Point b) {
    for (int x = a.x; x < b.x; x += 13)
      cv::line(img, {x, a.y}, {std::min(x + 8, b.x), b.y}, threshold_colour, 2, cv::LINE_AA);
  };
  if (o.threshold) dashed({left, py(*o.threshold)}, {right, py(*o.threshold)});

  cv::Mat plot = img(cv::Rect(left, top, right - left + 1, bottom - top + 1));
  for (size_t i = 0; i < series.size(); ++i) {
    const cv::Scalar colour = palette[i % palette.size()];
    std::vector<cv::Point> points;
    for (size_t k = 0; k < series[i].x.size(); ++k)
      if (std::isfinite(series[i].x[k]) && std::isfinite(series[i].y[k]))
        points.push_back({px(series[i].x[k]) - left, py(series[i].y[k]) - top});
    if (series[i].connect && points.size() > 1) cv::polylines(plot, points, false, colour, 2, cv::LINE_AA);
    for (size_t k = 0; k < series[i].x.size(); ++k) {
      const double e = error_bar(series[i], k);
      if (e == 0 || !std::isfinite(series[i].x[k]) || !std::isfinite(series[i].y[k])) continue;
      const int xx = px(series[i].x[k]) - left, lo = py(series[i].y[k] - e) - top, hi = py(series[i].y[k] + e) - top;
      cv::line(plot, {xx, lo}, {xx, hi}, colour, 1, cv::LINE_AA);
      for (const int yy : {lo, hi}) cv::line(plot, {xx - 4, yy}, {xx + 4, yy}, colour, 1, cv::LINE_AA);
    }
    if (!series[i].connect || points.size() <= 64)
      for (const auto& p : points) cv::circle(plot, p, 3, colour, cv::FILLED, cv::LINE_AA);
  }
  cv::rectangle(img, {left, top}, {right, bottom}, kDark, 1);

  int ly = top + 4;
  for (const auto& [label, index] : legend) {
    const int lx = right + 14, mid = ly + tick_h / 2 + 2;
    if (index < 0) {
      for (int x = lx; x < lx + 26; x += 13)
        cv::line(img, {x, mid}, {std::min(x + 8, lx + 26), mid}, threshold_colour, 2);
    } else {
      const cv::Scalar colour = palette[static_cast<size_t>(index) % palette.size()];
      if (series[static_cast<size_t>(index)].connect) cv::line(img, {lx, mid}, {lx + 26, mid}, colour, 2, cv::LINE_AA);
      cv::circle(img, {lx + 13, mid}, 3, colour, cv::FILLED, cv::LINE_AA);
    }
    draw_text(img, label, {lx + 32, mid}, kTick, -1, 0);
    ly += tick_h + 10;
  }
  return img;
}

std::string line_plot_png(const std::vector<LineSeries>& series, const LinePlotOptions& options) {
  return encode_png(line_plot_image(series, options));
}

cv::Mat overlay_image(const torch::Tensor& image, const torch::Tensor& heat, const OverlayOptions& o) {
  TORCH_CHECK(image.dim() == 3 && image.size(1) > 0 && image.size(2) > 0,
              "overlay: expected an image [C, H, W], got shape ", image.sizes());
  TORCH_CHECK(o.alpha >= 0.0 && o.alpha <= 1.0, "overlay: alpha must be in [0, 1], got ", o.alpha);
  TORCH_CHECK(o.size >= 16, "overlay: size must be >= 16 pixels, got ", o.size);
  torch::Tensor pixels = image.detach().to(torch::kCPU, torch::kFloat).clamp(0, 1);
  // Grey for one channel, RGB for three; other channel counts show their mean.
  if (pixels.size(0) != 1 && pixels.size(0) != 3) pixels = pixels.mean(0, true);
  pixels = pixels.mul(255).round().to(torch::kUInt8).permute({1, 2, 0}).contiguous();
  const int H = static_cast<int>(pixels.size(0)), W = static_cast<int>(pixels.size(1));
  cv::Mat rgb(H, W, pixels.size(2) == 1 ? CV_8U : CV_8UC3, pixels.data_ptr<uint8_t>()), bgr;
  cv::cvtColor(rgb, bgr, pixels.size(2) == 1 ? cv::COLOR_GRAY2BGR : cv::COLOR_RGB2BGR);
  const double zoom = static_cast<double>(o.size) / std::max(H, W);
  const cv::Size shown(std::max(1, static_cast<int>(std::lround(W * zoom))),
                       std::max(1, static_cast<int>(std::lround(H * zoom))));
  cv::resize(bgr, bgr, shown, 0, 0, zoom >= 1 ? cv::INTER_CUBIC : cv::INTER_AREA);

  if (heat.defined()) {
    TORCH_CHECK(heat.dim() == 2 && heat.numel() > 0, "overlay: expected a heat map [h, w], got shape ", heat.sizes());
    torch::Tensor values = to_cpu_double(heat);
    const auto [vmin, vmax] = value_range(values, o.vmin, o.vmax);
    torch::Tensor scaled = ((values - vmin) / (vmax - vmin)).clamp(0, 1).nan_to_num(0).to(torch::kFloat).contiguous();
    cv::Mat small(static_cast<int>(scaled.size(0)), static_cast<int>(scaled.size(1)), CV_32F, scaled.data_ptr<float>());
    cv::Mat big, levels, colours;
    cv::resize(small, big, shown, 0, 0, cv::INTER_LINEAR);
    big.convertTo(levels, CV_8U, 255.0);
    cv::applyColorMap(levels, colours, cv::COLORMAP_VIRIDIS);
    cv::addWeighted(bgr, 1.0 - o.alpha, colours, o.alpha, 0.0, bgr);
  }
  const int title_h = o.title.empty() ? 0 : text_size(o.title, kLabel).height + 6;
  const int width = std::max(shown.width, text_size(o.title, kLabel).width + 4);
  cv::Mat panel(title_h + shown.height, width, CV_8UC3, kWhite);
  if (!o.title.empty()) draw_text(panel, o.title, {width / 2, 0}, kLabel, 0, -1);
  paste(panel, bgr, (width - shown.width) / 2, title_h);
  return panel;
}

std::string overlay_png(const torch::Tensor& image, const torch::Tensor& heat, const OverlayOptions& options) {
  return encode_png(with_title(overlay_image(image, heat, options), "", ""));
}

cv::Mat panel_grid_image(const std::vector<cv::Mat>& panels, int columns, const std::string& title,
                         const std::string& subtitle) {
  if (panels.empty()) fail("panel grid: no panels");
  if (columns < 1) fail("panel grid: columns must be >= 1, got {}", columns);
  columns = std::min<int>(columns, static_cast<int>(panels.size()));
  int pw = 0, ph = 0;
  for (const auto& p : panels) {
    pw = std::max(pw, p.cols);
    ph = std::max(ph, p.rows);
  }
  const int rows = static_cast<int>((panels.size() + columns - 1) / columns), gap = 12;
  cv::Mat body(rows * ph + (rows - 1) * gap, columns * pw + (columns - 1) * gap, CV_8UC3, kWhite);
  for (size_t i = 0; i < panels.size(); ++i) {
    const int r = static_cast<int>(i) / columns, c = static_cast<int>(i) % columns;
    paste(body, panels[i], c * (pw + gap) + (pw - panels[i].cols) / 2, r * (ph + gap));
  }
  return with_title(body, title, subtitle);
}

}  // namespace vitlab
