#include "cli/common.h"

#include <fmt/format.h>

#include <utility>

#include "common/device.h"
#include "common/error.h"
#include "common/runtime.h"

namespace vitlab::cli {
namespace {

// --data SPEC as data.type and data.root.
std::vector<Override> data_spec_overrides(const std::string& spec) {
  const auto colon = spec.find(':');
  const std::string type = spec.substr(0, colon);
  if (type != "fashion_mnist" && type != "cifar10" && type != "imagefolder")
    fail("--data {}: expected fashion_mnist, cifar10:ROOT or imagefolder:ROOT", spec);
  std::vector<Override> o = {parse_override("data.type=" + type)};
  if (colon != std::string::npos) o.push_back({"data.root", YAML::Node(spec.substr(colon + 1))});
  return o;
}

}  // namespace

void add_threads(CLI::App* cmd, CommonOptions& common) {
  cmd->add_option("--threads", common.threads, "CPU threads (default: all logical CPUs)")
      ->check(CLI::NonNegativeNumber);
}

void add_device(CLI::App* cmd, CommonOptions& common) {
  cmd->add_option("--device", common.device, "cpu, cuda or cuda:N (train, eval: sets train.device)");
  cmd->add_option("--amp", common.amp, "Autocast: off, bf16 or fp16 (CUDA) (train, eval: sets train.amp)");
}

void add_model_options(CLI::App* cmd, std::string& model, CommonOptions& common, bool required) {
  cmd->add_option("--model", model, "Model preset (see `vitlab models`)")->required(required);
  cmd->add_option("--set", common.sets, "Override a model key, e.g. --set model.depth=6 (repeatable)");
}

std::vector<Override> parse_overrides(const std::vector<std::string>& sets) {
  std::vector<Override> out;
  for (const auto& s : sets) out.push_back(parse_override(s));
  return out;
}

std::vector<Override> run_overrides(const CommonOptions& common) {
  std::vector<Override> o = parse_overrides(common.sets);
  if (common.threads > 0) o.push_back(parse_override(fmt::format("train.threads={}", common.threads)));
  if (!common.device.empty()) o.push_back(parse_override("train.device=" + common.device));
  if (!common.amp.empty()) o.push_back(parse_override("train.amp=" + common.amp));
  return o;
}

torch::Device option_device(const CommonOptions& common) {
  return parse_device(common.device.empty() ? "cpu" : common.device, "--device");
}

at::ScalarType option_amp(const CommonOptions& common, const torch::Device& device) {
  return parse_amp(common.amp.empty() ? "off" : common.amp, device, "--amp");
}

void add_trained_model_options(CLI::App* cmd, TrainedModelArgs& args, CommonOptions& common,
                               const std::string& config_help, const std::string& set_help) {
  cmd->add_option("--checkpoint", args.checkpoint, "Run directory of `vitlab train`");
  cmd->add_option("--model", args.model, "Model preset (with --weights)");
  cmd->add_option("--weights", args.weights, "Weights file");
  cmd->add_option("--config", args.config, config_help);
  cmd->add_option("--set", common.sets, set_help);
}

void check_trained_model_args(const TrainedModelArgs& args) {
  if (args.checkpoint.empty() == args.model.empty())
    fail("give either --checkpoint RUN_DIR or --model NAME --weights FILE");
}

TrainedRun resolve_trained_run(const TrainedModelArgs& args, const CommonOptions& common,
                               const std::string& data_spec) {
  fs::path config = args.config, weights = args.weights;
  if (!args.checkpoint.empty()) {
    if (config.empty()) config = fs::path(args.checkpoint) / "config.yaml";
    if (weights.empty()) weights = fs::path(args.checkpoint) / "model.safetensors";
  } else if (weights.empty()) {
    fail("--model needs --weights FILE");
  }
  std::vector<Override> overrides = run_overrides(common);
  if (!args.model.empty()) overrides.push_back(parse_override("model.name=" + args.model));
  if (!data_spec.empty()) {
    const std::vector<Override> data = data_spec_overrides(data_spec);
    overrides.insert(overrides.end(), data.begin(), data.end());
  }
  TrainConfig cfg = TrainConfig::load(config, overrides);
  configure_threads(static_cast<int>(cfg.train.threads));
  const torch::Device device = parse_device(cfg.train.device, "train.device");
  const at::ScalarType amp = parse_amp(cfg.train.amp, device, "train.amp");
  return {std::move(cfg), weights, device, amp};
}

Model load_trained_model(const ModelSpec& spec, const fs::path& weights) {
  Model m = build_model(spec);
  load_weights(m, weights);
  return m;
}

LoaderOptions eval_loader_options(const TrainConfig& config, int64_t batch_size, const torch::Device& device) {
  LoaderOptions lo;
  lo.train = false;
  lo.batch_size = batch_size;
  lo.workers = static_cast<int>(config.data.workers);
  lo.skip_errors = config.data.on_error == "skip";
  lo.pin_memory = device.is_cuda();
  return lo;
}

}  // namespace vitlab::cli
