// `vitlab launch`: another subcommand as data-parallel processes on this machine.
#include <memory>

#include "cli/commands.h"
#include "train/distributed.h"

namespace vitlab::cli {
namespace {

struct LaunchArgs {
  int nproc = 1, port = 0;
  std::vector<std::string> command;
};

}  // namespace

Command add_launch_command(CLI::App& app) {
  auto a = std::make_shared<LaunchArgs>();
  auto* cmd = app.add_subcommand(
      "launch", "Run a subcommand as N data-parallel processes on this machine (as torchrun --standalone)");
  cmd->add_option("--nproc", a->nproc, "Processes (ranks)")->required()->check(CLI::PositiveNumber);
  cmd->add_option("--master-port", a->port, "Rendezvous port on 127.0.0.1 (0: a free one)")
      ->check(CLI::Range(0, 65535))
      ->capture_default_str();
  cmd->add_option("command", a->command, "After --: the subcommand and its options, e.g. -- train --config F")
      ->required();
  return {cmd, [a] { return launch_local(a->nproc, a->port, a->command); }};
}

}  // namespace vitlab::cli
