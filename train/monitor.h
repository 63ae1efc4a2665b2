#pragma once
// What a training run shows of itself while it trains, so that nobody needs
// a notebook to look at one: curves.png of loss, top-1 and learning rate per
// epoch, and with train.analysis.every the attention-collapse analysis
// (analysis/analyze.h) at initialisation and every N epochs, one row per
// analysis in analysis/curves.csv, drawn in analysis/curves.png.
#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "analysis/analyze.h"

namespace vitlab {

// metrics.csv's rows (epoch, train_loss, eval_loss, eval_top1, eval_top5,
// lr, and with EMA ema_eval_loss, ema_eval_top1, ema_eval_top5) as a PNG:
// loss, top-1 and learning rate against epoch.
std::string training_curves_png(const std::vector<std::string>& metrics_rows, const std::string& title);

// analysis/curves.csv: its header, and the row of the analysis after
// `epoch` epochs (0: at initialisation). A value the analysis did not
// measure (CKA of one image, adjacency of one block) is an empty cell.
std::string analysis_curves_header();
std::string analysis_curve_row(int64_t epoch, const AnalyzeReport& report);
// One run's rows of analysis/curves.csv, named in the legend (empty: none).
struct AnalysisCurves {
  std::string label;
  std::vector<std::string> rows;
};
// The rows of `csv` (a file analysis_curves_header() heads); none when it
// does not exist.
std::vector<std::string> read_analysis_curves(const std::filesystem::path& csv);
// Each column against epoch, a line per run, as a PNG.
std::string analysis_curves_png(const std::vector<AnalysisCurves>& runs, const std::string& title);

}  // namespace vitlab
