// vitlab command line: one subcommand per job, each with --help.
#include <fmt/format.h>
#include <torch/torch.h>

#include <CLI/CLI.hpp>
#include <vector>

#include "cli/commands.h"
#include "common/runtime.h"
#include "train/trainer.h"

int main(int argc, char** argv) {
  namespace cli = vitlab::cli;
  vitlab::configure_allocator();
  CLI::App app{"vitlab: vision transformers in C++ (ViT, DeepViT, Transformer) on LibTorch"};
  app.require_subcommand(1);
  app.set_version_flag("--version", vitlab::version());
  cli::CommonOptions common;

  // In the order `vitlab --help` lists them.
  const std::vector<cli::Command> commands = {
      cli::add_models_command(app, common),  cli::add_info_command(app, common),
      cli::add_forward_command(app, common), cli::add_convert_command(app, common),
      cli::add_compare_command(app, common), cli::add_data_command(app, common),
      cli::add_train_command(app, common),   cli::add_eval_command(app, common),
      cli::add_analyze_command(app, common), cli::add_study_command(app, common),
      cli::add_bench_command(app, common),   cli::add_launch_command(app),
  };

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  try {
    vitlab::configure_threads(common.threads);
    for (const auto& command : commands)
      if (*command.subcommand) return command.run();
  } catch (const vitlab::TrainingStopped& e) {
    fmt::print(stderr, "{}\n", e.what());
    return 128 + e.signal;  // the shell's code for death by that signal: a scheduler sees an interrupted job
  } catch (const c10::Error& e) {
    fmt::print(stderr, "error: {}\n", e.what_without_backtrace());
    return 1;
  } catch (const std::exception& e) {
    fmt::print(stderr, "error: {}\n", e.what());
    return 1;
  }
  return 0;
}
