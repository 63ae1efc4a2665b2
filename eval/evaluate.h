#pragma once
// Classification metrics of a model over a loader: the numbers timm reports
// (loss, top-1, top-5, in percent) plus per-class accuracy and the confusion
// matrix.
#include <torch/torch.h>

#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "data/loader.h"
#include "models/vit.h"

namespace vitlab {

struct EvalResult {
  int64_t images = 0;
  double loss = 0.0;
  double top1 = 0.0;              // percent
  double top5 = 0.0;              // percent
  torch::Tensor confusion;        // int64 [num_classes, num_classes]: row = true class, column = predicted
  std::vector<double> per_class;  // percent; NaN for a class with no images

  nlohmann::json to_json(const std::vector<std::string>& classes) const;
};

// amp: the autocast dtype (Undefined: fp32). sum_across: set when each
// process evaluates its shard of the split; the result is the whole split's.
EvalResult evaluate(VisionTransformerImpl& model, DataLoader& loader, int64_t num_classes, const torch::Device& device,
                    at::ScalarType amp = at::ScalarType::Undefined, const SumAcrossProcesses& sum_across = {});

// metrics.json, per_class.csv, confusion.csv and confusion.png in dir.
void write_eval_outputs(const EvalResult& result, const std::vector<std::string>& classes,
                        const std::filesystem::path& dir, const std::string& title);

}  // namespace vitlab
