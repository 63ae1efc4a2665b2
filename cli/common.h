#pragma once
// What the subcommands share: the options many of them take, the overrides
// those make, and finding a trained model from --checkpoint or --model
// --weights.
#include <torch/torch.h>

#include <CLI/CLI.hpp>
#include <functional>
#include <string>
#include <vector>

#include "common/config.h"
#include "common/files.h"
#include "data/loader.h"
#include "models/registry.h"
#include "train/config.h"

namespace vitlab::cli {

// One set for the whole app: only one subcommand runs, and each binds the
// options it takes here.
struct CommonOptions {
  int threads = 0;
  std::string device, amp;  // empty: the config's (train, eval) or cpu / off
  std::vector<std::string> sets;
};

// A registered subcommand and what running it does; run returns the exit status.
struct Command {
  CLI::App* subcommand;
  std::function<int()> run;
};

// The Command of a run function that reports failure by throwing: exit status 0 when it returns.
template <class Run>
Command make_command(CLI::App* subcommand, Run run) {
  return {subcommand, [run] {
            run();
            return 0;
          }};
}

void add_threads(CLI::App* cmd, CommonOptions& common);
void add_device(CLI::App* cmd, CommonOptions& common);
// --model PRESET and --set model.KEY=VALUE.
void add_model_options(CLI::App* cmd, std::string& model, CommonOptions& common, bool required = true);

std::vector<Override> parse_overrides(const std::vector<std::string>& sets);
// --set, then --threads, --device and --amp as shorthands for their train.* keys.
std::vector<Override> run_overrides(const CommonOptions& common);

// --device and --amp of the subcommands without a config: cpu and off unless given.
torch::Device option_device(const CommonOptions& common);
at::ScalarType option_amp(const CommonOptions& common, const torch::Device& device);

// A trained model: the run directory of `vitlab train`, or a preset and a
// weights file; --config and --set complete either.
struct TrainedModelArgs {
  std::string checkpoint, model, weights, config;
};

// --checkpoint, --model, --weights, --config and --set, with the help texts
// of the last two.
void add_trained_model_options(CLI::App* cmd, TrainedModelArgs& args, CommonOptions& common,
                               const std::string& config_help, const std::string& set_help);
// Exactly one of --checkpoint and --model.
void check_trained_model_args(const TrainedModelArgs& args);

struct TrainedRun {
  TrainConfig config;
  fs::path weights;
  torch::Device device = torch::kCPU;
  at::ScalarType amp = at::ScalarType::Undefined;
};

// The run's config (the checkpoint's config.yaml unless --config, then the
// overrides, `model.name` from --model and the data.* keys of data_spec) and
// weights (its model.safetensors unless --weights); sets the thread count
// and parses train.device and train.amp. data_spec: a --data SPEC,
// fashion_mnist, cifar10:ROOT or imagefolder:ROOT; empty: the config's data.
TrainedRun resolve_trained_run(const TrainedModelArgs& args, const CommonOptions& common,
                               const std::string& data_spec = "");

// Builds the model and loads its weights strictly.
Model load_trained_model(const ModelSpec& spec, const fs::path& weights);

// Evaluation batches in order, with the config's workers and error policy.
LoaderOptions eval_loader_options(const TrainConfig& config, int64_t batch_size, const torch::Device& device);

}  // namespace vitlab::cli
