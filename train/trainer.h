#pragma once
// `vitlab train`: a timm-style recipe for ViT and DeepViT (AdamW without
// decay on biases, norms and embeddings; warmup + cosine per step; Mixup,
// CutMix, label smoothing; EMA; gradient clipping and accumulation), with
// checkpoints that resume bit-for-bit on CPU.
#include <filesystem>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "data/loader.h"
#include "models/registry.h"
#include "train/config.h"

namespace vitlab {

struct DataSplits {
  std::shared_ptr<const ImageSource> train, val;
  std::vector<std::string> classes;
};

// Opens the configured dataset; ImageFolder warnings go to stderr. A split
// without a usable image is an error.
DataSplits open_data(const DataConfig& data);

// The configured model for a dataset of num_classes classes (model.num_classes
// defaults to it and must match it).
ModelSpec resolve_train_model(const TrainConfig& config, int64_t num_classes);

// The name of the first parameter whose gradient holds NaN or Inf, or ""
// when every gradient is finite (one device synchronisation).
std::string first_nonfinite_gradient(torch::nn::Module& model);

// Thrown by train() when SIGINT or SIGTERM stopped it, after it wrote
// checkpoint-last at the step where it stopped.
struct TrainingStopped : std::runtime_error {
  TrainingStopped(int signal, const std::string& message) : std::runtime_error(message), signal(signal) {}
  int signal;
};

// Trains into run_dir (created when missing). resume: continue from
// run_dir/checkpoint-last (or checkpoint-last-prev when that one is damaged;
// from the start when there is neither). stop_after > 0: stop once that many
// epochs of the schedule are done (a job time limit), to be continued with
// resume. SIGINT and SIGTERM stop it at the next optimizer step with a
// checkpoint (TrainingStopped). Returns the best eval top-1.
double train(const TrainConfig& config, const std::filesystem::path& run_dir, bool resume, int64_t stop_after = 0);

}  // namespace vitlab
