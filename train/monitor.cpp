#include "train/monitor.h"

#include <fmt/format.h>

#include <cmath>
#include <limits>
#include <sstream>

#include "common/error.h"
#include "common/files.h"
#include "plot/figures.h"

namespace vitlab {

namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// A CSV row's cells as numbers; an empty cell is NaN (a gap in the curve).
std::vector<double> cells(const std::string& row) {
  std::vector<double> out;
  std::stringstream in(row);
  for (std::string cell; std::getline(in, cell, ',');) out.push_back(cell.empty() ? kNaN : std::stod(cell));
  return out;
}

// Column `c` of the rows against column 0 (the epoch).
LineSeries column(const std::vector<std::vector<double>>& rows, size_t c, const std::string& label) {
  LineSeries s;
  s.label = label;
  for (const auto& r : rows)
    if (c < r.size()) {
      s.x.push_back(r[0]);
      s.y.push_back(r[c]);
    }
  return s;
}

cv::Mat panel(const std::vector<LineSeries>& series, const std::string& title) {
  LinePlotOptions o;
  o.title = title;
  o.x_label = "epoch";
  o.width = 460;
  o.height = 320;
  return line_plot_image(series, o);
}

std::string number(double v) { return std::isfinite(v) ? fmt::format("{:.8g}", v) : ""; }

double mean_or_nan(const torch::Tensor& t) { return t.defined() && t.numel() > 0 ? t.mean().item<double>() : kNaN; }

double last_or_nan(const torch::Tensor& t) { return t.defined() && t.numel() > 0 ? t[-1].item<double>() : kNaN; }

}  // namespace

std::string training_curves_png(const std::vector<std::string>& metrics_rows, const std::string& title) {
  std::vector<std::vector<double>> rows;
  for (const auto& r : metrics_rows) rows.push_back(cells(r));
  const bool ema = !rows.empty() && rows[0].size() > 6;
  std::vector<LineSeries> loss = {column(rows, 1, "train"), column(rows, 2, "eval")};
  std::vector<LineSeries> top1 = {column(rows, 3, "eval")};
  if (ema) {
    loss.push_back(column(rows, 6, "eval (EMA)"));
    top1.push_back(column(rows, 7, "eval (EMA)"));
  }
  return encode_png(panel_grid_image(
      {panel(loss, "loss"), panel(top1, "top-1 (%)"), panel({column(rows, 5, "")}, "learning rate (last step)")}, 3,
      title, "from metrics.csv, redrawn each epoch"));
}

std::string analysis_curves_header() {
  return "epoch,images,similar_blocks,mean_adjacent_similarity,mean_attention_entropy,mean_attention_distance,"
         "last_token_uniformity,last_rank_residual,last_effective_rank,mean_adjacent_cka\n";
}

std::string analysis_curve_row(int64_t epoch, const AnalyzeReport& report) {
  const SimilarityResult& s = report.similarity;
  const MeasureResult& m = report.measures;
  const double cka = m.cka.defined() && m.cka.size(0) > 1 ? m.cka.diagonal(1).mean().item<double>() : kNaN;
  return fmt::format("{},{},{},{},{},{},{},{},{},{}", epoch, s.images, s.similar_blocks,
                     number(mean_or_nan(s.adjacent)), number(mean_or_nan(m.entropy)), number(mean_or_nan(m.distance)),
                     number(last_or_nan(m.uniformity)), number(last_or_nan(m.residual)),
                     number(last_or_nan(m.effective_rank)), number(cka));
}

std::vector<std::string> read_analysis_curves(const std::filesystem::path& csv) {
  std::vector<std::string> rows;
  if (!std::filesystem::exists(csv)) return rows;
  std::stringstream in(read_file(csv));
  std::string line;
  std::getline(in, line);
  if (line + "\n" != analysis_curves_header())
    fail("{}: expected the header {}, got '{}'", csv.string(), analysis_curves_header(), line);
  while (std::getline(in, line))
    if (!line.empty()) rows.push_back(line);
  return rows;
}

std::string analysis_curves_png(const std::vector<AnalysisCurves>& runs, const std::string& title) {
  std::vector<std::vector<std::vector<double>>> values;
  for (const auto& run : runs) {
    values.emplace_back();
    for (const auto& r : run.rows) values.back().push_back(cells(r));
  }
  const std::vector<std::pair<size_t, std::string>> panels = {{2, "similar blocks"},
                                                              {3, "mean adjacent similarity"},
                                                              {4, "mean attention entropy (nats)"},
                                                              {5, "mean attention distance (px)"},
                                                              {6, "last block's token uniformity"},
                                                              {7, "last block's rank residual"},
                                                              {8, "last block's effective rank"},
                                                              {9, "mean adjacent CKA"}};
  std::vector<cv::Mat> images;
  for (const auto& [c, name] : panels) {
    std::vector<LineSeries> series;
    for (size_t i = 0; i < runs.size(); ++i) series.push_back(column(values[i], c, runs[i].label));
    images.push_back(panel(series, name));
  }
  return encode_png(panel_grid_image(images, 4, title, "analysis/curves.csv: the collapse measures against epoch"));
}

}  // namespace vitlab
