// `vitlab convert`: weights checked against a model, written as .safetensors or .pt.
#include <fmt/format.h>

#include <memory>

#include "cli/commands.h"
#include "io/state_dict.h"

namespace vitlab::cli {
namespace {

struct ConvertArgs {
  std::string model, weights, out;
};

void run_convert(const ConvertArgs& a, const CommonOptions& common) {
  Model m = create_model(a.model, parse_overrides(common.sets));
  load_weights(m, a.weights, /*strict=*/true);
  const StateDict state = module_state(*m.module);
  write_weights(a.out, state);
  fmt::print("wrote {} ({} tensors, {} parameters)\n", a.out, state.size(), count_parameters(*m.module));
}

}  // namespace

Command add_convert_command(CLI::App& app, CommonOptions& common) {
  auto a = std::make_shared<ConvertArgs>();
  auto* cmd = app.add_subcommand("convert", "Check weights against a model and write them as .safetensors or .pt");
  add_model_options(cmd, a->model, common);
  cmd->add_option("--weights", a->weights, "Input weights")->required();
  cmd->add_option("--out", a->out, "Output file (.safetensors, .pt, .pth or .bin)")->required();
  add_threads(cmd, common);
  return make_command(cmd, [a, &common] { run_convert(*a, common); });
}

}  // namespace vitlab::cli
