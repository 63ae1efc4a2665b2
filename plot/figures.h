#pragma once
// Plotting primitives drawn with OpenCV, for the figures vitlab writes
// (confusion matrix, attention-similarity heatmaps, curves, attention
// overlays). Each returns a BGR image (to compose further) or PNG bytes (to
// hand to StagedOutputs / write_file_atomic). Matrices are drawn in matrix
// orientation: row 0 at the top, column 0 at the left.
#include <torch/torch.h>

#include <opencv2/core.hpp>
#include <optional>
#include <string>
#include <vector>

namespace vitlab {

struct HeatmapOptions {
  std::string title;
  std::string subtitle;  // a smaller second line under the title
  std::string x_label;   // under the columns
  std::string y_label;   // left of the rows, written bottom to top
  // Tick labels; empty: the index plus tick_start. Long column labels are
  // written vertically; labels that would overlap are thinned out.
  std::vector<std::string> row_labels, col_labels;
  int64_t tick_start = 0;
  // Colour range; unset: the finite data's min / max.
  std::optional<double> vmin, vmax;
  bool colorbar = true;
  // Each cell's value written in it, where the value fits the cell.
  bool annotate = true;
  int value_decimals = 2;
  int cell = 0;       // pixels per cell; 0: the matrix takes about 480 px
  int min_width = 0;  // pad the figure to at least this width (a long title)
};

// matrix: [R, C], any real dtype and device. NaN cells are drawn grey.
cv::Mat heatmap_image(const torch::Tensor& matrix, const HeatmapOptions& options = {});
std::string heatmap_png(const torch::Tensor& matrix, const HeatmapOptions& options = {});

struct HeatmapGridOptions {
  std::string title;
  std::string subtitle;
  std::vector<std::string> panel_titles;  // one per matrix; empty: none
  std::string x_label, y_label;           // each panel's axes
  int64_t tick_start = 0;
  std::optional<double> vmin, vmax;  // shared by all panels; unset: the data's min / max
  int columns = 0;                   // panels per row; 0: about square
  int panel = 0;                     // matrix pixels per panel; 0: about 180
  bool annotate = true;              // values in cells where they fit
  int value_decimals = 2;
};

// matrices: [N, R, C], drawn as N heatmaps with one shared colour bar.
cv::Mat heatmap_grid_image(const torch::Tensor& matrices, const HeatmapGridOptions& options = {});
std::string heatmap_grid_png(const torch::Tensor& matrices, const HeatmapGridOptions& options = {});

struct LineSeries {
  std::string label;  // in the legend; empty: not listed
  std::vector<double> x, y;
  bool connect = true;  // false: the points alone (a scatter)
  // ± err[i] around y[i], drawn as a vertical bar with caps (e.g. a standard
  // deviation over seeds); empty: none.
  std::vector<double> err = {};
};

struct LinePlotOptions {
  std::string title;
  std::string subtitle;
  std::string x_label, y_label;
  bool integer_x = true;             // x ticks on whole numbers only
  std::optional<double> ymin, ymax;  // unset: the data's range, with some room
  std::optional<double> threshold;   // a dashed horizontal line
  std::string threshold_label;       // its legend entry
  int width = 760, height = 460;
};

cv::Mat line_plot_image(const std::vector<LineSeries>& series, const LinePlotOptions& options = {});
std::string line_plot_png(const std::vector<LineSeries>& series, const LinePlotOptions& options = {});

struct OverlayOptions {
  std::string title;                 // above the panel
  double alpha = 0.5;                // weight of the heat map over the image
  int size = 160;                    // the panel's image side in pixels
  std::optional<double> vmin, vmax;  // heat range; unset: the map's min / max
};

// image: [C, H, W] (C = 1 grey, 3 RGB), values in [0, 1]; heat: [h, w], any
// range, resized bilinearly to the image. Without heat (undefined tensor)
// the panel shows the image alone.
cv::Mat overlay_image(const torch::Tensor& image, const torch::Tensor& heat, const OverlayOptions& options = {});
std::string overlay_png(const torch::Tensor& image, const torch::Tensor& heat, const OverlayOptions& options = {});

// Panels laid out in rows of `columns` under a title, on white.
cv::Mat panel_grid_image(const std::vector<cv::Mat>& panels, int columns, const std::string& title,
                         const std::string& subtitle = "");

std::string encode_png(const cv::Mat& image);

}  // namespace vitlab
