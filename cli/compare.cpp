// `vitlab compare`: the max absolute difference of two tensors saved by torch.save.
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <torch/torch.h>

#include <memory>

#include "cli/commands.h"
#include "common/error.h"
#include "io/torch_file.h"

namespace vitlab::cli {
namespace {

struct CompareArgs {
  std::string a, b;
  double atol = 1e-4;
};

// Exit status 2 when the tensors differ by more than atol.
int run_compare(const CompareArgs& a) {
  torch::Tensor x = read_torch_tensor(a.a), y = read_torch_tensor(a.b);
  if (x.sizes() != y.sizes()) fail("{} has shape {} but {} has shape {}", a.a, x.sizes().vec(), a.b, y.sizes().vec());
  const double diff = x.numel() ? (x.to(torch::kDouble) - y.to(torch::kDouble)).abs().max().item<double>() : 0.0;
  const bool ok = diff <= a.atol;
  fmt::print("{} vs {}: shape {}, max |a - b| = {:.3g} ({} atol {:g})\n", a.a, a.b, x.sizes().vec(), diff,
             ok ? "within" : "EXCEEDS", a.atol);
  return ok ? 0 : 2;
}

}  // namespace

Command add_compare_command(CLI::App& app, CommonOptions& common) {
  auto a = std::make_shared<CompareArgs>();
  auto* cmd = app.add_subcommand("compare", "Max absolute difference of two tensors saved by torch.save");
  cmd->add_option("a", a->a, "First tensor file")->required();
  cmd->add_option("b", a->b, "Second tensor file")->required();
  cmd->add_option("--atol", a->atol, "Tolerance: exit status 2 when exceeded")->capture_default_str();
  add_threads(cmd, common);
  return {cmd, [a] { return run_compare(*a); }};
}

}  // namespace vitlab::cli
