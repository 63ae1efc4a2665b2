#include "eval/evaluate.h"

#include <fmt/format.h>

#include <cmath>

#include "common/device.h"
#include "common/files.h"
#include "plot/figures.h"

namespace vitlab {

EvalResult evaluate(VisionTransformerImpl& model, DataLoader& loader, int64_t num_classes, const torch::Device& device,
                    at::ScalarType amp, const SumAcrossProcesses& sum_across) {
  const bool was_training = model.is_training();
  model.eval();
  torch::NoGradGuard no_grad;
  EvalResult r;
  r.confusion = torch::zeros({num_classes, num_classes}, torch::kInt64);
  double loss_sum = 0.0, top1 = 0.0, top5 = 0.0;
  loader.begin_epoch(0);
  while (auto batch = loader.next()) {
    torch::Tensor x = batch->images.to(device, /*non_blocking=*/true);
    torch::Tensor y = batch->labels.to(device, /*non_blocking=*/true);
    torch::Tensor logits;
    {
      Autocast autocast(device, amp);
      logits = model.forward(x).to(torch::kFloat);
    }
    loss_sum += torch::nn::functional::cross_entropy(logits, y).item<double>() * y.size(0);
    const int64_t k = std::min<int64_t>(5, num_classes);
    torch::Tensor topk = std::get<1>(logits.topk(k, 1));
    torch::Tensor hits = topk.eq(y.unsqueeze(1));
    top1 += hits.select(1, 0).sum().item<double>();
    top5 += hits.any(1).sum().item<double>();
    torch::Tensor pairs = (y * num_classes + topk.select(1, 0)).cpu();
    r.confusion += torch::bincount(pairs, {}, num_classes * num_classes).reshape({num_classes, num_classes});
    r.images += y.size(0);
  }
  model.train(was_training);
  if (sum_across) {
    std::vector<torch::Tensor> sums{
        torch::tensor({loss_sum, top1, top5, static_cast<double>(r.images)}, torch::kDouble), r.confusion};
    sum_across(sums);
    loss_sum = sums[0][0].item<double>();
    top1 = sums[0][1].item<double>();
    top5 = sums[0][2].item<double>();
    r.images = sums[0][3].item<int64_t>();
  }
  if (r.images == 0) return r;
  r.loss = loss_sum / r.images;
  r.top1 = 100.0 * top1 / r.images;
  r.top5 = 100.0 * top5 / r.images;
  for (int64_t c = 0; c < num_classes; ++c) {
    const double n = r.confusion[c].sum().item<double>();
    r.per_class.push_back(n > 0 ? 100.0 * r.confusion[c][c].item<double>() / n : std::nan(""));
  }
  return r;
}

nlohmann::json EvalResult::to_json(const std::vector<std::string>& classes) const {
  nlohmann::json per = nlohmann::json::object();
  for (size_t c = 0; c < per_class.size(); ++c)
    per[classes.at(c)] = std::isnan(per_class[c]) ? nlohmann::json() : nlohmann::json(per_class[c]);
  return {{"images", images}, {"loss", loss}, {"top1", top1}, {"top5", top5}, {"per_class_top1", per}};
}

namespace {

// The confusion matrix as a heatmap, rows normalised to the class's images.
std::string confusion_png(const torch::Tensor& confusion, const std::vector<std::string>& classes,
                          const std::string& title) {
  const auto n = static_cast<int>(confusion.size(0));
  torch::Tensor rows = confusion.to(torch::kDouble);
  rows = rows / rows.sum(1, true).clamp_min(1);
  HeatmapOptions o;
  o.title = title;
  o.subtitle = "row-normalised: the share of each true class predicted as each class";
  o.x_label = "predicted class";
  o.y_label = "true class";
  for (const auto& c : classes) o.row_labels.push_back(c.substr(0, 18));
  o.col_labels = o.row_labels;
  o.vmin = 0.0;
  o.vmax = 1.0;
  o.cell = std::max(12, std::min(48, 640 / std::max(n, 1)));
  return heatmap_png(rows, o);
}

}  // namespace

void write_eval_outputs(const EvalResult& r, const std::vector<std::string>& classes, const std::filesystem::path& dir,
                        const std::string& title) {
  std::string per_class = "class,images,top1\n", confusion = "true\\predicted";
  for (const auto& c : classes) confusion += "," + c;
  confusion += "\n";
  for (size_t i = 0; i < classes.size(); ++i) {
    per_class += fmt::format("{},{},{:.4f}\n", classes[i], r.confusion[i].sum().item<int64_t>(), r.per_class.at(i));
    confusion += classes[i];
    for (size_t j = 0; j < classes.size(); ++j) confusion += fmt::format(",{}", r.confusion[i][j].item<int64_t>());
    confusion += "\n";
  }
  StagedOutputs out;
  out.add(dir / "metrics.json", r.to_json(classes).dump(2) + "\n");
  out.add(dir / "per_class.csv", per_class);
  out.add(dir / "confusion.csv", confusion);
  out.add(dir / "confusion.png", confusion_png(r.confusion, classes, title));
  out.commit();
}

}  // namespace vitlab
