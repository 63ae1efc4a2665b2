// `vitlab study`: DeepViT's depth-scaling experiment, member by member.
#include "study/study.h"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <torch/torch.h>

#include <algorithm>
#include <memory>

#include "cli/commands.h"

namespace vitlab::cli {
namespace {

struct StudyArgs {
  std::string config, out;
  int jobs = 1;
  std::vector<std::string> members;
};

// How a member process is started: the same options and a share of the threads in effect.
std::vector<std::string> member_command(const StudyArgs& a, const CommonOptions& common) {
  const int threads = torch::get_num_threads();
  std::vector<std::string> command = {"study",
                                      "--config",
                                      a.config,
                                      "--out",
                                      a.out,
                                      "--threads",
                                      std::to_string(std::max(1, threads / std::max(1, a.jobs)))};
  for (const auto& s : common.sets) command.insert(command.end(), {"--set", s});
  if (!common.device.empty()) command.insert(command.end(), {"--device", common.device});
  if (!common.amp.empty()) command.insert(command.end(), {"--amp", common.amp});
  return command;
}

void run_study_command(const StudyArgs& a, const CommonOptions& common) {
  StudyRunOptions run;
  run.jobs = a.jobs;
  run.members = a.members;
  run.member_command = member_command(a, common);
  const fs::path report = run_study(StudyConfig::load(a.config, run_overrides(common)), a.out, run);
  if (report.empty())
    fmt::print("study: {} done\n", fmt::join(a.members, ", "));
  else
    fmt::print("study done: {}\n", report.string());
}

}  // namespace

Command add_study_command(CLI::App& app, CommonOptions& common) {
  auto a = std::make_shared<StudyArgs>();
  auto* cmd =
      app.add_subcommand("study", "DeepViT's depth-scaling experiment: train, evaluate and analyse each member");
  cmd->add_option("--config", a->config, "YAML with a study section and the shared training recipe")->required();
  cmd->add_option("--set", common.sets,
                  "Override a recipe key (train.epochs=2) or study.depths / study.analysis.KEY (repeatable)");
  cmd->add_option("--out", a->out, "Study directory (rerun to continue)")->required();
  cmd->add_option("--jobs", a->jobs,
                  "Members trained at once, each in its own process with a share of the threads (a GPU "
                  "fits several small models)")
      ->check(CLI::PositiveNumber);
  cmd->add_option("--member", a->members,
                  "Only this member, e.g. ViT_d32 (repeatable): trained and analysed, no report");
  add_threads(cmd, common);
  add_device(cmd, common);
  return make_command(cmd, [a, &common] { run_study_command(*a, common); });
}

}  // namespace vitlab::cli
