// `vitlab train`: a ViT or DeepViT trained from a YAML config into a run directory.
#include <memory>

#include "cli/commands.h"
#include "train/trainer.h"

namespace vitlab::cli {
namespace {

struct TrainArgs {
  std::string config, out;
  bool resume = false;
  int64_t stop_after = 0;
};

void run_train(const TrainArgs& a, const CommonOptions& common) {
  // Resuming without --config takes the run's own.
  fs::path config = a.config;
  if (config.empty() && a.resume && fs::exists(fs::path(a.out) / "config.yaml"))
    config = fs::path(a.out) / "config.yaml";
  train(TrainConfig::load(config, run_overrides(common)), a.out, a.resume, a.stop_after);
}

}  // namespace

Command add_train_command(CLI::App& app, CommonOptions& common) {
  auto a = std::make_shared<TrainArgs>();
  auto* cmd = app.add_subcommand("train", "Train a ViT or DeepViT from a YAML config");
  cmd->add_option("--config", a->config, "YAML with sections model, data, optim, schedule, aug, train");
  cmd->add_option("--set", common.sets, "Override any key, e.g. --set train.epochs=2 (repeatable)");
  cmd->add_option("--out", a->out, "Run directory")->required();
  cmd->add_flag("--resume", a->resume, "Continue from RUN_DIR/checkpoint-last");
  cmd->add_option("--stop-after", a->stop_after, "Stop after this many epochs of the schedule (resume later)")
      ->check(CLI::NonNegativeNumber);
  add_threads(cmd, common);
  add_device(cmd, common);
  return make_command(cmd, [a, &common] { run_train(*a, common); });
}

}  // namespace vitlab::cli
