// `vitlab models` and `vitlab info`: the presets, and one model's resolved configuration.
#include <fmt/format.h>

#include <memory>
#include <nlohmann/json.hpp>

#include "cli/commands.h"

namespace vitlab::cli {
namespace {

void run_models() {
  fmt::print("{:<34} {:<12} {:>14}  {}\n", "name", "family", "parameters", "description");
  for (const auto& p : presets()) {
    fmt::print("{:<34} {:<12} {:>14}  {}\n", p.name, p.family, spec_parameters(resolve_model(p.name)), p.description);
  }
}

void run_info(const std::string& name, const CommonOptions& common) {
  ModelSpec spec = resolve_model(name, parse_overrides(common.sets));
  nlohmann::json j = {
      {"name", spec.name}, {"family", spec.family}, {"parameters", spec_parameters(spec)}, {"config", spec.config}};
  fmt::print("{}\n", j.dump(2));
}

}  // namespace

Command add_models_command(CLI::App& app, CommonOptions& common) {
  auto* cmd = app.add_subcommand("models", "List model presets with their parameter counts");
  add_threads(cmd, common);
  return make_command(cmd, run_models);
}

Command add_info_command(CLI::App& app, CommonOptions& common) {
  auto model = std::make_shared<std::string>();
  auto* cmd = app.add_subcommand("info", "Print a model's resolved configuration and parameter count as JSON");
  add_model_options(cmd, *model, common);
  add_threads(cmd, common);
  return make_command(cmd, [model, &common] { run_info(*model, common); });
}

}  // namespace vitlab::cli
